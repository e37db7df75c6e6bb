"""Tasks: what is predicted and how it is scored. Each task owns its head (on pooled features
of any model family), its loss, its metrics and the batch fields it reads, so a training loop
asks the task instead of branching on it:

    task = VQATask(answers)                      # or ClassificationTask, NLVRTask, RetrievalTask
    head = task.head(in_dim)                     # pooled (B, d) -> outputs
    loss = task.loss(outputs, batch)             # batch: a dict holding task.fields
    task.metrics(outputs, batch, split="val")    # whole split: {"val_vqa_score": ...}

Metrics are percentages named ``{split}_{name}``: ``top1`` (classification, NLVR),
``vqa_score`` (VQA), ``ir_r1/5/10`` and ``tr_r1/5/10`` (retrieval); ``task.main_metric`` is the one
to select on.
"""

from .base import Task
from .classification import ClassificationTask
from .generation import GenerationTask
from .nlvr import NLVRHead, NLVRTask
from .retrieval import RetrievalTask, retrieval_recalls
from .vqa import VQATask, vqa_score

TASKS = {"classification": ClassificationTask, "vqa": VQATask, "nlvr": NLVRTask, "retrieval": RetrievalTask,
         "generation": GenerationTask}

__all__ = ["ClassificationTask", "GenerationTask", "NLVRHead", "NLVRTask", "RetrievalTask", "TASKS", "Task", "VQATask",
           "retrieval_recalls", "vqa_score"]
