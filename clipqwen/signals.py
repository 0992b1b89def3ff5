"""Preemption: SIGTERM (what Kubernetes, SLURM and spot instances send before a kill) or Ctrl-C ends training with
a checkpoint instead of losing the steps since the last one. CaptionTrainer installs the callback while `train()`
runs; run_captioning.py then exits with status 0, and the same command resumes."""

import os
import signal
import threading

from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM (what Kubernetes, SLURM and spot-instance preemption send before killing) or Ctrl-C (SIGINT),
    finish the current optimizer step, save a checkpoint and stop; run_captioning.py then exits with status 0
    without evaluating or exporting, and rerunning the same command resumes. A second signal kills at once (the
    default action).

    `reduce(flag) -> flag` makes all processes agree (any process signalled → all stop at the same step), which
    a distributed save needs."""

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
