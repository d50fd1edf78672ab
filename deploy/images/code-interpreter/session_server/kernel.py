"""One IPython kernel per container: stateful execution with timeouts, interrupt and restart."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from .models import BoundedText, Outcome
from .settings import Settings

log = logging.getLogger(__name__)

# The mime type under which the kernel reports JSON-native last-expression values, so that
# `1 + 1` comes back as the number 2 (as ACA does) rather than the string "2".
SCALAR_MIME = "application/vnd.sessionpool.scalar+json"

# Run silently in every new kernel. A function keeps its names out of the user namespace.
_SETUP_CODE = """
def __sessionpool_setup(preload):
    import importlib, math
    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    ip = get_ipython()
    ip.run_line_magic("colors", "NoColor")

    class ScalarFormatter(BaseFormatter):
        format_type = Unicode(%(mime)r)
        _return_type = (dict,)
        print_method = ObjectName("_repr_sessionpool_scalar_")

    def scalar(value):
        # NaN and infinities are not JSON; ACA reports NaN as null.
        if isinstance(value, float) and not math.isfinite(value):
            return {"value": None}
        return {"value": value}

    formatter = ScalarFormatter(parent=ip.display_formatter)
    for kind in (bool, int, float, str):
        formatter.for_type(kind, scalar)
    ip.display_formatter.formatters[formatter.format_type] = formatter
    for name in preload:
        importlib.import_module(name)
    # `plt.show()` under Agg warns that it cannot show; the figure is returned anyway.
    import warnings
    warnings.filterwarnings("ignore", message=".*non-interactive, and thus cannot be shown")
    if any(name.startswith("matplotlib") for name in preload):
        ip.run_line_magic("matplotlib", "inline")

    def send_open_figures():
        # After every execution (registered after the inline backend's own flush, which shows
        # and closes its figures first): any matplotlib figure still open is sent as an image
        # and closed, whatever the backend. Code that picked Agg, as much generated code does,
        # draws figures that plt.show() never displays. Part of the execution itself, so it
        # costs no extra round trip and falls under the execution's timeout.
        import sys
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None or not plt.get_fignums():
            return
        import base64, io
        from IPython.display import display
        try:
            for num in plt.get_fignums():
                buf = io.BytesIO()
                plt.figure(num).savefig(buf, format="png", bbox_inches="tight")
                display({"image/png": base64.b64encode(buf.getvalue()).decode()}, raw=True)
        except Exception as exc:
            print(f"The figure could not be rendered: {exc!r}", file=sys.stderr)
        finally:
            plt.close("all")

    ip.events.register("post_execute", send_open_figures)

__sessionpool_setup(%(preload)r)
del __sessionpool_setup
"""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes (IPython tracebacks carry them)."""
    return _ANSI.sub("", text)


class KernelStartError(RuntimeError):
    """The kernel did not start or did not become ready in time."""


@dataclass
class _Collector:
    """Turns the IOPub messages of one execution into an `Outcome`."""

    limit: int
    stdout: BoundedText = field(init=False)
    stderr: BoundedText = field(init=False)
    result: Any = ""
    result_text: str | None = None
    image: dict[str, str] | None = None
    error_name: str = ""
    error_message: str = ""

    def __post_init__(self) -> None:
        self.stdout = BoundedText(self.limit)
        self.stderr = BoundedText(self.limit)

    def feed(self, msg: dict[str, Any]) -> bool:
        """Take one message; return True when the kernel went idle (execution finished)."""
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind == "status":
            return bool(content.get("execution_state") == "idle")
        if kind == "stream":
            target = self.stderr if content.get("name") == "stderr" else self.stdout
            target.append(content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            self._feed_data(content.get("data", {}), is_result=kind == "execute_result")
        elif kind == "error":
            self.error_name = content.get("ename", "")
            self.error_message = content.get("evalue", "")
            self.stderr.append(strip_ansi("\n".join(content.get("traceback", []))) + "\n")
        return False

    def _feed_data(self, data: dict[str, Any], *, is_result: bool) -> None:
        png = data.get("image/png")
        if isinstance(png, str):
            # The last figure wins: it is what the code ended up drawing.
            self.image = {"type": "image", "format": "png", "base64_data": png.replace("\n", "")}
        elif is_result:
            self.result_text = data.get("text/plain")
            scalar = data.get(SCALAR_MIME)
            if isinstance(scalar, dict) and "value" in scalar:
                self.result = scalar["value"]
            else:
                self.result = self.result_text if self.result_text is not None else ""
        elif "text/plain" in data:
            # `display(obj)` without a figure: shown to the caller as output.
            self.stdout.append(str(data["text/plain"]) + "\n")

    def outcome(self, started: float, **extra: Any) -> Outcome:
        return Outcome(
            stdout=str(self.stdout),
            stderr=str(self.stderr),
            result=self.image if self.image is not None else self.result,
            result_text=self.result_text,
            error_name=self.error_name,
            error_message=self.error_message,
            duration_ms=int((time.monotonic() - started) * 1000),
            **extra,
        )


class Kernel:
    """An IPython kernel owned by this server; callers serialise `execute` themselves."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._km: AsyncKernelManager | None = None
        self._kc: AsyncKernelClient | None = None

    async def start(self) -> None:
        """Start a fresh kernel and run the setup code in it.

        Raises:
            KernelStartError: the kernel did not become ready within the start timeout.
        """
        km = AsyncKernelManager(kernel_name="python3")
        env = dict(os.environ)
        # Inline figures become display_data image/png messages.
        env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        await km.start_kernel(
            cwd=str(self._settings.data_dir),
            env=env,
            extra_arguments=["--HistoryManager.enabled=False"],
        )
        kc = km.client()
        kc.start_channels()
        self._km, self._kc = km, kc
        try:
            await kc.wait_for_ready(timeout=self._settings.kernel_start_timeout_s)
        except RuntimeError as exc:
            await self.stop()
            raise KernelStartError(f"kernel did not become ready: {exc}") from exc
        setup = _SETUP_CODE % {"mime": SCALAR_MIME, "preload": self._settings.preload_modules}
        outcome = await self._run(
            setup, self._settings.kernel_start_timeout_s, 65536, user_code=False
        )
        if outcome.timed_out or outcome.error_name == "KernelDied":
            await self.stop()
            raise KernelStartError(f"kernel setup did not complete: {outcome.error_message}")
        if outcome.failed:
            # A missing optional module must not take the whole image down; say so loudly.
            log.error("kernel setup failed: %s", outcome.stderr)

    async def stop(self) -> None:
        """Shut the kernel down (idempotent)."""
        kc, km = self._kc, self._km
        self._kc = self._km = None
        if kc is not None:
            kc.stop_channels()
        if km is not None and await km.is_alive():
            await km.shutdown_kernel(now=True)

    async def restart(self) -> None:
        """Replace the kernel with a fresh one; every variable is lost."""
        await self.stop()
        await self.start()

    async def is_alive(self) -> bool:
        """True when the kernel process is running."""
        return self._km is not None and bool(await self._km.is_alive())

    async def execute(self, code: str, timeout_s: float, max_output: int) -> Outcome:
        """Run `code`; on timeout interrupt the kernel, and restart it if that does not work.

        The kernel is restarted (before running) if it died since the last call.
        """
        restarted = False
        if not await self.is_alive():
            log.warning("kernel is not running; starting a new one")
            await self.restart()
            restarted = True
        outcome = await self._run(code, timeout_s, max_output, user_code=True)
        return replace(outcome, kernel_restarted=outcome.kernel_restarted or restarted)

    async def _run(
        self, code: str, timeout_s: float, max_output: int, *, user_code: bool
    ) -> Outcome:
        """Execute in the current kernel. For user code, recover from death and timeouts by
        interrupting and restarting; for the setup code, just report them (no recursion)."""
        started = time.monotonic()
        restarted = False
        kc, km = self._kc, self._km
        assert kc is not None
        assert km is not None
        await self._drain_shell(kc)
        msg_id = kc.execute(code, store_history=user_code, allow_stdin=False, stop_on_error=True)
        collector = _Collector(max_output)
        loop = asyncio.get_running_loop()
        state = await self._collect(kc, msg_id, collector, loop.time() + timeout_s)
        if state == "died":
            note = (
                "The kernel died while running this code; it was restarted "
                "(all variables were lost)."
            )
            collector.stderr.append(note + "\n")
            if user_code:
                await self.restart()
            outcome = collector.outcome(started, kernel_restarted=user_code)
            return replace(outcome, error_name="KernelDied", error_message=note)
        if state == "timeout" and not user_code:
            return replace(collector.outcome(started, timed_out=True), error_message="timed out")
        if state == "timeout":
            deadline = loop.time() + self._settings.interrupt_grace_s
            grace = "timeout"
            window_s = 0.5
            while grace == "timeout" and loop.time() < deadline:
                # Repeated: an interrupt that lands before the kernel starts running the
                # code (a loaded machine) is lost, and the loop would then run on. Each wait
                # is longer than the last, so that a kernel slow to finish handling the first
                # is not hit by a second one it could carry into the next execution.
                await km.interrupt_kernel()
                until = min(deadline, loop.time() + window_s)
                grace = await self._collect(kc, msg_id, collector, until)
                window_s *= 2
            note = f"Execution timed out after {timeout_s:g} seconds and was interrupted."
            if grace != "idle":
                note = (
                    f"Execution timed out after {timeout_s:g} seconds; the kernel did not stop "
                    "on interrupt and was restarted (all variables were lost)."
                )
                await self.restart()
                restarted = True
            collector.stderr.append(note + "\n")
            outcome = collector.outcome(started, timed_out=True, kernel_restarted=restarted)
            return replace(outcome, error_name="TimeoutError", error_message=note)
        return collector.outcome(started)

    async def _collect(
        self, kc: AsyncKernelClient, msg_id: str, collector: _Collector, deadline: float
    ) -> str:
        """Feed IOPub messages of `msg_id` to `collector` until idle, timeout or death."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "timeout"
            try:
                msg = await kc.get_iopub_msg(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not await self.is_alive():
                    return "died"
                continue
            # Messages of an earlier, interrupted execution may still arrive; skip them.
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if collector.feed(msg):
                return "idle"

    @staticmethod
    async def _drain_shell(kc: AsyncKernelClient) -> None:
        """Discard execute replies left over from earlier executions."""
        while True:
            try:
                await kc.get_shell_msg(timeout=0)
            except queue.Empty:
                return
