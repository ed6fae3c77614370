"""Jobs: an sqlite store of pipeline runs (download, measure, strategy, convert, verify) and the worker that
runs each as a subprocess with visible progress, cancel, and resume after a restart."""

from jobs.kinds import KINDS, ParamError, get_kind, parse_progress
from jobs.store import FINAL_STATES, STATES, Job, JobError, JobStore

__all__ = ["FINAL_STATES", "KINDS", "STATES", "Job", "JobError", "JobStore", "ParamError", "get_kind",
           "parse_progress"]
