"""The reasoner's LLM engine: Qwen2 run by our own code on our own kernels.

- ``model``: the Qwen2 modules and the torch forward (a GPU's prefill; the tests' reference).
- ``cpu``: the CPU forward on the native kernels (kernels/cpu), for every weight format.
- ``cuda_graphs``: one-token decode steps on a CUDA GPU as CUDA graph replays.
- ``load`` and ``gguf``: building the model from safetensors, the int8 cache or a GGUF.
- ``int8``: the int8 format's layers and cache file.
- ``formats``: which format a model runs in (decided once) and the caches, named by fingerprint.
- ``prepare``: the packaged models (GGUF parts in registry packages) reassembled and converted.
- ``cache``: the KV cache whose layers grow in place.
- ``engine``: ``LLMEngine``, the decode loop the stage calls.
"""
