# The training loop and its job set-up.
from mmgen.trainer.signals import REQUEUE_EXIT_CODE

__all__ = ["REQUEUE_EXIT_CODE"]
