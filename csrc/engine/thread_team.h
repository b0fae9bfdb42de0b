// A team of threads kept for a whole training call, so that a step too small
// for at::parallel_for's fork and join still runs its chunks on two threads.
//
// Why: a 100-row curve-fit step (1→[20]×3→1, ~13 µs on one thread) split
// into two chunks ran at 11 µs a step when OpenMP's threads kept spinning
// between the steps (OMP_WAIT_POLICY=active) and at 21 µs when the second
// thread went to sleep after each parallel region and had to be woken — which
// of the two a process got was a matter of chance. A user's environment is
// not ours to set; a fit call's own team is. Its helpers spin between passes
// (and yield when they have spun long), as an active OpenMP team does, for as
// long as the call runs, and leave when it returns.
//
// A team is not always faster. How long a step's data (the packed weights, a
// chunk's partial sums) takes to cross between two cores depends on where the
// host puts this machine's vCPUs: the same 100-row step ran at 10.8 µs on two
// threads in one hour and at 17–21 µs in another, when a round trip between
// the two cores took 320–440 ns instead of 75–130 (one thread: 14.5 µs). So a
// call first times its steps both ways (TeamProbe) and dismisses the helpers
// where they do not pay. Either way every chunk is computed the same, so the
// choice changes the time, never the bits.
//
// Work is claimed, not assigned: every member — the calling thread (the
// leader) and each helper — takes the next unclaimed chunk of the current
// pass until none is left, and the leader waits only for the chunks that
// were claimed. A helper that never started (the region got fewer threads
// than asked for, or the backend queues its tasks) is therefore never waited
// for: the leader runs the chunks itself. Which thread runs a chunk does not
// change its result: each chunk writes its own partial sums, which the pass
// adds in chunk order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "mlp_engine.h"

namespace fusedgrad::engine {

class ThreadTeam final : public ChunkRunner {
 public:
  // Runs leader(team) on this thread with up to `threads` − 1 helpers serving the team's passes, or
  // leader(nullptr) where no second thread can be had (one thread, or already inside a parallel
  // region). Returns when the leader does; an exception of the leader's is rethrown after the
  // helpers have left.
  template <typename Leader>
  static void lead(int64_t threads, Leader&& leader) {
    if (threads < 2 || at::get_num_threads() < 2 || at::in_parallel_region()) {
      leader(static_cast<const ChunkRunner*>(nullptr));
      return;
    }
    ThreadTeam team;
    teams_led_.fetch_add(1, std::memory_order_relaxed);
    at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t) {
      if (i0 != 0) {
        team.serve();
        return;
      }
      struct Dismiss {  // the helpers leave however the leader returns
        ThreadTeam& t;
        ~Dismiss() { t.dismiss(); }
      } dismiss{team};
      leader(static_cast<const ChunkRunner*>(&team));
    });
  }

  // Sends the helpers away: the leader runs every later pass alone (a null runner).
  void dismiss() const { stop_.store(true, std::memory_order_release); }

  // How many teams lead() has formed in this process (tests: fusedgrad._C._testing_teams_led).
  static int64_t teams_led() { return teams_led_.load(std::memory_order_relaxed); }

  // Called by the leader only: chunk(0 … chunks − 1), each exactly once, on whichever members claim them.
  void run(int64_t chunks, const std::function<void(int64_t)>& chunk,
           const std::function<void()>* waiting = nullptr) const override {
    if (chunks <= 0) return;
    fn_.store(&chunk, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(job << 32, std::memory_order_release);  // publishes the job: claims start at chunk 0
    work(job);
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (waiting) (*waiting)();
      pause(spins);
    }
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  ThreadTeam() = default;

  static void pause(int64_t spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();  // spun ~10–50 µs: the leader is busy elsewhere (an all-reduce, a long update)
    }
  }

  // Claims and runs chunks of job `job` until none is left (or a newer job was published).
  void work(uint64_t job) const {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s >> 32) != job) return;
      const int64_t chunks = chunks_.load(std::memory_order_relaxed);
      const std::function<void(int64_t)>* fn = fn_.load(std::memory_order_relaxed);
      const auto next = static_cast<int64_t>(s & 0xffffffffu);
      if (next >= chunks) return;
      // The claim succeeds only while `job` is current, so chunks and fn read above are this job's.
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      try {
        (*fn)(next);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // A helper: waits for each new job, works on it, until dismissed.
  void serve() const {
    uint64_t seen = 0;
    int64_t spins = 0;
    for (;;) {
      const uint64_t job = state_.load(std::memory_order_acquire) >> 32;
      if (job != seen) {
        seen = job;
        spins = 0;
        work(job);
      } else if (stop_.load(std::memory_order_acquire)) {
        return;
      } else {
        pause(spins++);
      }
    }
  }

  // Each on a cache line of its own: the team lives on the leader's stack, and a helper spinning on a
  // line the leader also writes its own locals to slowed every step (by chance of the stack's
  // alignment: some processes ran the curve-fit step at 11 µs, others at 20).
  // The job number (high 32 bits) and its next unclaimed chunk (low 32 bits), claimed by CAS.
  alignas(64) mutable std::atomic<uint64_t> state_{0};
  alignas(64) mutable std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  mutable std::atomic<int64_t> chunks_{0};
  alignas(64) mutable std::atomic<int64_t> done_{0};
  alignas(64) mutable std::atomic<bool> stop_{false};
  mutable std::mutex error_mutex_;
  mutable std::exception_ptr error_;
  alignas(64) char end_[1] = {};  // nothing of the leader's after the team on stop_'s line
  static inline std::atomic<int64_t> teams_led_{0};
};

// Which runner each step of a call uses: its first steps alternate between the team and the leader
// alone (step 0, which warms the caches, is not timed), then the faster way runs the rest — the
// helpers dismissed if it is the leader alone. Without a team (null): always null. With `probing`
// false (steps a second thread always pays for: team_always_pays) the team runs every step. The
// probe's solo steps are its cost: the PINN-sized step (2 540 rows) took 208 µs alone against 113
// on the team, so its four solo steps added ~380 µs to every call (fit(50): 120 against 113 µs a step).
class TeamProbe {
 public:
  TeamProbe(const ThreadTeam* team, bool probing) : team_(team), probing_(probing) {}

  const ChunkRunner* runner(int64_t step) const {
    if (!team_ || solo_) return nullptr;
    if (!probing_ || step < 1 || step > 2 * kProbes) return team_;
    return step % 2 == 1 ? team_ : nullptr;
  }

  // Whether step `step` is one of the probe's timed steps (the caller reads the clock only for those).
  bool timing(int64_t step) const { return team_ && probing_ && !solo_ && step >= 1 && step <= 2 * kProbes; }

  // The time of step `step`, run with runner(step).
  void record(int64_t step, double seconds) {
    if (!timing(step)) return;
    double& best = step % 2 == 1 ? best_team_ : best_solo_;
    best = std::min(best, seconds);
    if (step == 2 * kProbes && best_solo_ < best_team_) {
      solo_ = true;
      team_->dismiss();
    }
  }

  // Whether the call's steps run on the team after the probe (fusedgrad.explain cannot know it beforehand).
  bool solo() const { return solo_; }

 private:
  static constexpr int64_t kProbes = 4;  // steps timed each way
  const ThreadTeam* team_;
  bool probing_;
  bool solo_ = false;
  double best_team_ = 1e300, best_solo_ = 1e300;
};

}  // namespace fusedgrad::engine
