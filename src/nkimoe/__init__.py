"""nkimoe: a kernel variant registry for Qwen3-30B-A3B on AWS Trainium2 and Trainium3."""

from __future__ import annotations

__version__ = "0.1.0"
