"""Which attention backend a render picks, as data: the order per device and the words for the choice.

`attention.select_backend` probes what this machine can run and walks this order;
the memory planner, which must answer without importing torch (`threedis plan`),
names the backend a render on the profile's device picks where every backend works
there (on CUDA: with triton installed). Both read the order and the reasons from here.
"""

from __future__ import annotations

__all__ = ["AUTO_ORDER", "AUTO_ORDER_OTHER", "auto_order", "auto_reason", "expected_backend"]

# Per device type. On CPU, FlexAttention runs eager (unfused: it materialises every head's
# scores), which is slower than SDPA with one shared dense mask, so auto prefers sdpa there.
AUTO_ORDER = {"cuda": ("triton", "flex", "sdpa")}
AUTO_ORDER_OTHER = ("sdpa", "flex")


def auto_order(device_type: str) -> tuple[str, ...]:
    return AUTO_ORDER.get(device_type, AUTO_ORDER_OTHER)


def auto_reason(device_type: str, dtype_name: str, name: str, skipped: list[str]) -> str:
    """The reason "auto" gives for `name` on a device, after passing over `skipped` ("name: why")."""
    passed_over = f" (passed over {'; '.join(skipped)})" if skipped else ""
    why = "" if device_type == "cuda" else (
        "; off CUDA the triton kernel does not run compiled and eager FlexAttention is "
        "slower than SDPA with one dense mask")
    return f"auto on {device_type} / {dtype_name}: {name}{passed_over}{why}"


def expected_backend(device_type: str, dtype_name: str, requested: str = "auto") -> tuple[str, str]:
    """(backend, reason) a render on `device_type` uses where every backend there works: the plan's answer."""
    where = f"{device_type} / {dtype_name}"
    if requested != "auto":
        return requested, f"requested explicitly ({where})"
    skipped = []
    for name in auto_order(device_type):
        if name == "triton" and device_type != "cuda":
            skipped.append("triton: needs a CUDA device")
            continue
        return name, auto_reason(device_type, dtype_name, name, skipped)
    raise ValueError(f"no attention backend for {device_type}")  # pragma: no cover - every order is non-empty
