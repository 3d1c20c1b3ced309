"""Shared reference implementations for the LLM inference-acceleration course.

Notebooks and labs import from here and never paste this code. Three layers, one import rule:

1. **core**: chapters may import it; it imports no chapter and not the course model.
   ``paths`` (repository-relative paths), ``device`` (device choice, clear errors for a missing
   GPU or package), ``bench`` (timing with ``torch.utils.benchmark``, memory, bandwidth, CPU
   flags and what the kernels can use of them, the thread policy), ``metrics`` (perplexity,
   agreement, KL, cosine), ``data`` (corpus, splits, token windows), ``models`` (loading,
   generation, finding and replacing linear layers, weight bytes, the training recipe),
   ``validation`` (argument checks with one wording), ``plots``, ``report``
   (``python -m utils.report``, which finds chapters itself), ``nbtools`` and ``notebook_setup``
   (building and running notebooks), ``pytest_plugin`` (the test run's thread and ISA policy).
2. **the course model**: ``llama``, the course's Llama in one readable file (config, RMSNorm,
   RoPE, decoder block, static KV cache); it imports core only.
3. **one module per chapter**, named after its technique (``roofline`` 00, ``fusion`` 01,
   ``quantization`` 02, then ``pruning``, ``distillation``, ``lowrank``, ``kvcache``,
   ``parallel``, ``export``, ``triton_kernels``, ``capstone``). A chapter module assigns
   ``CHAPTER = "NN"`` and defines ``report_rows(quick=False)`` (a chapter that outgrows one module
   puts the rest in a second, marked ``CHAPTER_PART = "NN"``: 06's ``serving``); it imports core, ``llama`` and
   earlier chapters it builds on (04 heals 03's pruned teacher), never a later one (the capstone
   may import any). Optional packages import where used.

The lab system is its own subpackage, ``utils.labs`` (spec, self-check, generator, grader,
sandbox); it imports core only, and its lab specs (``utils/labs/specs``) are the one bridge to
chapter modules. ``tests/test_chapters.py`` enforces the rule.

Nothing happens at import: importing any module here changes no global setting (threads,
dtypes, registries); notebooks set threads explicitly in their set-up cell.
"""

__version__ = "0.1.0"
