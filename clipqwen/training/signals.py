"""Preemption: SIGTERM (sent by Kubernetes, SLURM and spot instances before a kill) or Ctrl-C ends
training with a checkpoint instead of losing its last steps; the same command then resumes."""

import os
import signal
import threading

from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM or SIGINT, finish the optimizer step, save a checkpoint and stop; a second signal
    kills at once. `reduce(flag) -> flag` makes all processes stop at the same step and save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, reduce=None):
        self.reduce = reduce
        self.requested = None  # the signal received
        self.stopped_at = None  # the global step a checkpoint was saved at because of it
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            logger.info("Not in the main thread: SIGTERM and Ctrl-C will not trigger a checkpoint.")
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.requested).name if self.requested is not None else None

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # a second signal: stop waiting
            self.uninstall()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        logger.warning(
            "Received %s: saving a checkpoint after the current step, then stopping.", signal.Signals(signum).name
        )

    def stop_now(self) -> bool:
        flag = self.requested is not None
        return bool(self.reduce(flag)) if self.reduce is not None else flag

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_now():
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period is short: save first
            self.stopped_at = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the loop was left after the save: no epoch-end evaluation or second save
            control.should_save = False
            control.should_evaluate = False
        return control
