"""Personalizing a fleet: many users' adapters trained, gated and registered together.

Import-light on purpose (no torch here), so a CLI or scheduler can import the package to find its parts:
``lowra.sdk.fleet.batched`` (grouped LoRA layers: one frozen base, K users' factors, one batched matmul per layer)
``lowra.sdk.fleet.train`` (``train_users``: K users trained in one process, sharing every step),
``lowra.sdk.fleet.gate`` (which adapters may ship) and ``lowra.sdk.fleet.registry`` (what each user has).
"""
