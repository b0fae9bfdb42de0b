"""What a direct ``.grad`` write would skip: the gradient hooks ``backward()`` runs.

Placeholder until the full detection (DDP's accumulator hooks) lands.
"""


def grad_hooks(param):
    """Descriptions of the hooks ``backward()`` would run for ``param``; empty if none."""
    found = []
    if getattr(param, "_backward_hooks", None):
        found.append("tensor hooks (register_hook)")
    if getattr(param, "_post_accumulate_grad_hooks", None):
        found.append("post-accumulate-grad hooks (register_post_accumulate_grad_hook)")
    return found
