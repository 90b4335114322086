"""Guidance: what turns a rendered camera batch into an SDS gradient.

A guidance is one module that implements `guidance.base.Guidance` and registers a factory under
the name the config's `guidance` key selects (`guidance.registry.register`). The built-in ones,
`stable_diffusion` and `target_mesh`, are registered by the phases package, which imports them.
This package's __init__ stays free of torch: config validation reads the registry's names.
"""
