"""The coefficients of the float tanh in csrc/common/cpu_vector.h (tanh_rational), reproduced.

tanh x ≈ x P(s) / Q(s), s = x², P and Q of degree 5 with P(0) = Q(0) = 1, on [0, 9]: the
relative error's least squares, linearised (x P − t Q = t − x, divided by t Q of the previous
iterate) and reweighted toward the largest errors (Lawson), in the scaled variable s/81 for
conditioning. Prints the largest relative error before rounding and the coefficients rounded to
float, highest degree first, as cpu_vector.h writes them; the accuracy of the float evaluation
(every float, against the correctly rounded tanh) is measured in C++, not here.

    python scripts/fit_tanh.py
"""
import numpy as np

CLAMP, DEG_P, DEG_Q = 9.0, 5, 5


def fit(iterations=60):
    x = np.unique(np.concatenate([np.linspace(1e-4, CLAMP, 20000), np.geomspace(1e-6, 1.0, 2000)]))
    t, u = np.tanh(x), (x / CLAMP) ** 2
    powers_p = np.stack([u ** i for i in range(1, DEG_P + 1)], 1)
    powers_q = np.stack([u ** j for j in range(1, DEG_Q + 1)], 1)
    weight = np.ones_like(x)
    p, q = np.zeros(DEG_P), np.zeros(DEG_Q)
    for _ in range(iterations):
        scale = weight / (t * (1 + powers_q @ q))
        design = np.concatenate([x[:, None] * powers_p, -t[:, None] * powers_q], 1) * scale[:, None]
        sol = np.linalg.lstsq(design, (t - x) * scale, rcond=None)[0]
        p, q = sol[:DEG_P], sol[DEG_P:]
        err = np.abs(x * (1 + powers_p @ p) / (1 + powers_q @ q) - t) / t
        weight = weight * np.sqrt(err / err.max()) + 1e-12
        weight /= weight.max()
    return p, q, err.max()


def main():
    p, q, worst = fit()
    print(f"largest relative error on [0, {CLAMP}] before rounding: {worst:.2e}")
    for name, c in (("P", p), ("Q", q)):
        coeffs = [float(np.float32(c[i] / CLAMP ** (2 * (i + 1)))) for i in range(len(c))]
        print(name, "(s⁵ … s¹, then 1):", ", ".join(f"{v.hex()}" for v in reversed(coeffs)))


if __name__ == "__main__":
    main()
