"""The engine: what an edit is (sites, selections, interventions, registries, recordings, frames)
and how it runs (the layout of one model, the pure plan, the hooks and the attention routing),
with `Model`, the handle on top. Imports only `splice.architectures` and `splice.errors`."""
