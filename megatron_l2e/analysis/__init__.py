"""Monosemanticity analysis of GPT-NeoX checkpoints (L2E paper Section 3 and Appendix B).

``python -m megatron_l2e.analysis <probe|validate|ks|layers|fkr|trajectory|report> ...`` — see
docs/analysis.md. Modules: ``features`` (labelled datasets, the stdlib dataset builder),
``activations`` (forward hooks), ``stats`` (MS math on top of ``megatron_l2e.l2e.functional``),
``plots`` (matplotlib), ``commands`` (one function per command), ``trajectory`` (metrics.jsonl),
``cli`` (argument parsing and validation).

The analysis reuses L2E's MS code and the Hugging Face model only; it never imports the training
loop.
"""

from .features import DEFAULT_STDLIB_CLASSES, build_stdlib_dataset, read_features, write_jsonl
from .stats import (feature_means, fkr_curve, ks_pooled, ks_statistic, ms_matrix, probe_f1, relative_feature)

__all__ = [
    "DEFAULT_STDLIB_CLASSES",
    "build_stdlib_dataset",
    "read_features",
    "write_jsonl",
    "ms_matrix",
    "feature_means",
    "relative_feature",
    "probe_f1",
    "ks_statistic",
    "ks_pooled",
    "fkr_curve",
]
