"""Executions: queued one at a time (one kernel per container), kept for later polling."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import BadRequestError, ExecutionConflictError, ExecutionNotFoundError
from .models import ExecutionRequest, Kind, Outcome
from .settings import Settings
from .shell import run_command

if TYPE_CHECKING:  # the shell image has no Jupyter: the kernel module is imported on demand
    from .kernel import Kernel

log = logging.getLogger(__name__)

_EXECUTION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")


class Status(enum.StrEnum):
    """`Azure.Core.Foundations.OperationState`, as the new contract reports it."""

    NOT_STARTED = "NotStarted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"


@dataclass
class Execution:
    """One execution and, once finished, its outcome."""

    id: str
    request: ExecutionRequest
    status: Status = Status.NOT_STARTED
    outcome: Outcome | None = None
    # Set when the server itself failed (a bug, or the kernel could not be restarted).
    internal_error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)


class Executor:
    """Runs executions strictly one after another, in arrival order.

    Every execution runs in a task the executor owns, so a caller that disconnects does not
    cancel code half-way and leave the kernel in an unknown state.
    """

    def __init__(self, settings: Settings, kernel: Kernel | None) -> None:
        """`kernel` is None in a Shell session, where requests never carry Python code."""
        self._settings = settings
        self._kernel = kernel
        # asyncio.Lock wakes waiters in FIFO order, which is the queue we want.
        self._lock = asyncio.Lock()
        self._executions: OrderedDict[str, Execution] = OrderedDict()

    def submit(self, request: ExecutionRequest, execution_id: str | None = None) -> Execution:
        """Queue `request`; `execution_id` is the client's `operation-id`, if it sent one.

        Raises:
            BadRequestError: `execution_id` is not a plain token of at most 128 characters.
            ExecutionConflictError: `execution_id` is already taken.
        """
        if execution_id is not None and not _EXECUTION_ID.fullmatch(execution_id):
            raise BadRequestError("'operation-id' must be 1-128 characters of A-Z a-z 0-9 . _ ~ -")
        if execution_id in self._executions:
            raise ExecutionConflictError(f"Execution '{execution_id}' already exists.")
        execution = Execution(id=execution_id or str(uuid.uuid4()), request=request)
        if not self._lock.locked():
            # Nothing ahead of it: it starts on the next loop iteration, so say so already.
            execution.status = Status.RUNNING
        execution.task = asyncio.create_task(self._run(execution), name=f"exec-{execution.id}")
        self._executions[execution.id] = execution
        self._prune()
        return execution

    async def wait(self, execution: Execution) -> Execution:
        """Wait for `execution` to finish; cancelling the caller does not cancel it."""
        assert execution.task is not None
        await asyncio.shield(execution.task)
        return execution

    def get(self, execution_id: str) -> Execution:
        """An execution by id.

        Raises:
            ExecutionNotFoundError: unknown, or dropped from the retained history.
        """
        try:
            return self._executions[execution_id]
        except KeyError:
            raise ExecutionNotFoundError(
                f"No execution available for operation id '{execution_id}'."
            ) from None

    async def close(self) -> None:
        """Cancel whatever is queued or running."""
        tasks = [e.task for e in self._executions.values() if e.task and not e.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, execution: Execution) -> None:
        request = execution.request
        async with self._lock:
            execution.status = Status.RUNNING
            try:
                if request.kind is Kind.PYTHON:
                    assert self._kernel is not None  # parse_execution_request refused it
                    outcome = await self._kernel.execute(
                        request.code, request.timeout_s, request.max_output
                    )
                else:
                    outcome = await run_command(
                        request.argv,
                        request.stdin,
                        request.timeout_s,
                        request.max_output,
                        self._settings.data_dir,
                    )
            except asyncio.CancelledError:
                execution.status = Status.CANCELED
                raise
            except Exception as exc:  # the task boundary: report, log, keep serving
                log.exception("execution %s failed inside the server", execution.id)
                execution.internal_error = f"{type(exc).__name__}: {exc}"
                execution.status = Status.FAILED
                return
        execution.outcome = outcome
        execution.status = Status.FAILED if outcome.failed else Status.SUCCEEDED

    def _prune(self) -> None:
        finished = [e.id for e in self._executions.values() if e.finished]
        for execution_id in finished[: max(0, len(finished) - self._settings.retained_executions)]:
            del self._executions[execution_id]
