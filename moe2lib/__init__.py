"""moe2lib: the tested core of the MoE2 reproduction (gating, subset selection, fused experts)."""

__version__ = "0.1.0"
