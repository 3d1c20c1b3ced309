"""Shared reference implementations for the LLM inference-acceleration course.

Notebooks and labs import from here and never paste this code. One module per concern:

- ``utils.paths``     repository-relative paths (no dependence on the working directory)
- ``utils.device``    device choice and clear errors for missing GPUs or optional packages
- ``utils.bench``     timing (torch.utils.benchmark), peak memory, tokens/s, machine report
- ``utils.metrics``   perplexity, next-token agreement and KL, embedding cosine similarity
- ``utils.plots``     matplotlib helpers every chapter reuses
- ``utils.data``      the course corpus and its train/validation split
- ``utils.models``    the course's Llama models, MiniLM, and their training recipe
- ``utils.roofline``  chapter 00: machine peaks, arithmetic intensity, memory formulas
- ``utils.fusion``    chapter 01: the memory-traffic model of fusion, online softmax, FX passes
- ``utils.quantization`` chapter 02: affine/NF4/GPTQ quantization, int8 GEMM, KV-cache int8
- ``utils.report``    ``python -m utils.report``: every chapter's headline measurements
- ``utils.labs``, ``utils.labs.check``, ``utils.labs.grade``, ``utils.labs.sandbox``, ``utils.labspecs``:
  the lab system (generate labs from solutions, learner self-checks, the batch autograder)
- ``utils.nbtools``, ``utils.notebook_setup``: build and execute the notebooks

Importing ``utils`` changes no global setting.
"""

__version__ = "0.1.0"
