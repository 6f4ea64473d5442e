"""The same five edits, the residual recording and the head-ablation sweep, written once per library.

Each library class builds its own copy of the shared GPT-2 weights (some wrappers change the
model they wrap: the TransformerLens bridge switches it to eager attention, nnsight replaces
its submodules' `forward`), and exposes:

- `zero_head`, `scale_mlp`, `add_last`, `patch_pos(inp)` -> logits `[batch, pos, vocab]`
  (one call = one edited forward, set-up and tear-down of the edit included; `patch_pos`
  also runs the source prompts, as every library must);
- `record_resid(inp)` -> the 12 `resid_post` tensors;
- `sweep(ids, heads, a, b)` -> for each `(layer, head)` in `heads`, the mean over prompts of the
  last-position logit difference `logits[a] - logits[b]` with that head's z zeroed;
- `cannot`: `{edit: reason}` for edits the library cannot express.

Peer modules are imported inside the classes, so this file imports in every venv.
"""

from __future__ import annotations

from collections.abc import Callable

import common as C


class Library:
    key = "?"
    label = "?"
    version = ""
    cannot: dict[str, str] = {}

    def __init__(self, tiny: bool = False):
        self.tiny = tiny
        self.hf = C.build_hf(tiny)
        self.config = self.hf.config
        self.n_layer, self.n_head = self.config.n_layer, self.config.n_head
        self.d_head = self.config.n_embd // self.n_head
        self.head = min(C.ZERO_HEAD, self.n_head - 1)  # the tiny model has 4 heads: head 3 there

    def call(self, edit: str) -> Callable:
        if edit in self.cannot:
            raise NotImplementedError(self.cannot[edit])
        return getattr(self, edit)

    @staticmethod
    def loop_sweep(zeroed_logits: Callable, heads, a: int, b: int) -> list[float]:
        """The plain loop: one forward per head, `zeroed_logits(layer, head)` -> logits."""
        values = []
        for layer, head in heads:
            last = zeroed_logits(layer, head)[:, -1]
            values.append(float((last[:, a] - last[:, b]).mean()))
        return values


# ---------------------------------------------------------------------------------------------
# The references: the bare model and hand-written torch hooks on the HF modules


class Bare(Library):
    key, label = "bare", "bare HF forward"

    def forward(self, inp):
        return self.hf(inp.ids).logits


class HandHooks(Library):
    """Plain `register_forward_(pre_)hook`s on the HF GPT-2 modules: the independent reference."""

    key, label = "hand", "hand-written torch hooks"

    def _with(self, module, hook, pre: bool, inp_ids):
        handle = (
            module.register_forward_pre_hook(hook, with_kwargs=True)
            if pre
            else module.register_forward_hook(hook)
        )
        try:
            return self.hf(inp_ids).logits
        finally:
            handle.remove()

    def zero_head(self, inp, layer: int = C.ZERO_LAYER, head: int | None = None):
        head = self.head if head is None else head
        d = self.d_head

        def hook(module, args, kwargs):
            z = args[0].clone()
            z[..., head * d : (head + 1) * d] = 0
            return (z,) + tuple(args[1:]), kwargs

        return self._with(self.hf.transformer.h[layer].attn.c_proj, hook, True, inp.ids)

    def scale_mlp(self, inp):
        return self._with(
            self.hf.transformer.h[C.SCALE_LAYER].mlp, lambda m, a, out: out * C.SCALE, False, inp.ids
        )

    def add_last(self, inp):
        def hook(module, args, out):
            out = out.clone()
            out[:, -1] += inp.v
            return out

        return self._with(self.hf.transformer.h[C.ADD_LAYER], hook, False, inp.ids)

    def patch_pos(self, inp):
        block = self.hf.transformer.h[C.PATCH_LAYER]
        source = {}

        def read(module, args, kwargs):
            source["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

        def write(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, C.PATCH_POS] = source["x"][:, C.PATCH_POS]
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        handle = block.register_forward_pre_hook(read, with_kwargs=True)
        try:
            self.hf(inp.other)
        finally:
            handle.remove()
        return self._with(block, write, True, inp.ids)

    def record_resid(self, inp):
        out = {}
        handles = [
            block.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o.clone()))
            for i, block in enumerate(self.hf.transformer.h)
        ]
        try:
            self.hf(inp.ids)
        finally:
            for h in handles:
                h.remove()
        return [out[i] for i in range(self.n_layer)]

    def sweep(self, ids, heads, a, b):
        """The plain loop people write today: one hooked forward per head (as in sweep.py)."""
        inputs = C.Inputs(ids, ids, None)
        return self.loop_sweep(lambda layer, head: self.zero_head(inputs, layer, head), heads, a, b)


# ---------------------------------------------------------------------------------------------
# splice


class Splice(Library):
    key, label = "splice", "splice"

    def __init__(self, tiny: bool = False):
        super().__init__(tiny)
        import splice

        self.splice = splice
        self.version = splice.__version__
        self.m = splice.Model(self.hf)

    def _run(self, ids, edits=None, record=None):
        return self.m.run(ids, edits=edits, record=record)

    def zero_head(self, inp):
        return self._run(inp.ids, {f"blocks.{C.ZERO_LAYER}.attn.z": self.splice.Zero(heads=self.head)})[0]

    def scale_mlp(self, inp):
        return self._run(inp.ids, {f"blocks.{C.SCALE_LAYER}.mlp.out": self.splice.Scale(C.SCALE)})[0]

    def add_last(self, inp):
        return self._run(inp.ids, {f"blocks.{C.ADD_LAYER}.resid_post": self.splice.Add(inp.v, pos=-1)})[0]

    def patch_pos(self, inp):
        site = f"blocks.{C.PATCH_LAYER}.resid_pre"
        _, recording = self.m.run(inp.other, record=site, stop_after_record=True)  # layers 0-3 only
        return self._run(inp.ids, {site: self.splice.Patch(recording, pos=C.PATCH_POS)})[0]

    def record_resid(self, inp):
        _, rec = self._run(inp.ids, record="blocks.*.resid_post")
        return [rec[f"blocks.{l}.resid_post"] for l in range(self.n_layer)]

    def sweep(self, ids, heads, a, b):
        layers = sorted({l for l, _ in heads})
        data = [{"input_ids": row, "a": a, "b": b} for row in ids.tolist()]
        sweep = self.splice.Sweep(
            sites=[f"blocks.{l}.attn.z" for l in layers],
            interventions=self.splice.Zero(),
            over="heads",
            metrics=[self.splice.metrics.logit_diff("a", "b")],
        )
        table = sweep.run(self.m, data, batch_size=len(data), progress=False)
        table = table[table.variant >= 0]
        value = {(int(r.layer), int(r.head)): float(r.value) for r in table.itertuples()}
        return [value[lh] for lh in heads]


# ---------------------------------------------------------------------------------------------
# TransformerLens: HookedTransformer (3.x, its own GPT-2 implementation) and TransformerBridge (4.x)


def _tl_hooks_zero(head):
    def hook(z, hook):  # [batch, pos, head, d_head]
        z[:, :, head] = 0
        return z

    return hook


class _TLBase(Library):
    """The calls both TransformerLens flavours share (`run_with_hooks`, `run_with_cache`)."""

    model = None

    def _logits(self, ids, hooks):
        return self.model.run_with_hooks(ids, fwd_hooks=hooks)

    def zero_head(self, inp):
        return self._logits(inp.ids, [(f"blocks.{C.ZERO_LAYER}.attn.hook_z", _tl_hooks_zero(self.head))])

    def scale_mlp(self, inp):
        return self._logits(inp.ids, [(f"blocks.{C.SCALE_LAYER}.hook_mlp_out", lambda x, hook: x * C.SCALE)])

    def add_last(self, inp):
        def hook(x, hook):
            x[:, -1] += inp.v
            return x

        return self._logits(inp.ids, [(f"blocks.{C.ADD_LAYER}.hook_resid_post", hook)])

    def patch_pos(self, inp):
        name = f"blocks.{C.PATCH_LAYER}.hook_resid_pre"
        # TL's early stop is per block: hook_resid_pre of block 4 needs blocks 0-4
        _, cache = self.model.run_with_cache(inp.other, names_filter=name, stop_at_layer=C.PATCH_LAYER + 1)
        source = cache[name]

        def hook(x, hook):
            x[:, C.PATCH_POS] = source[:, C.PATCH_POS]
            return x

        return self._logits(inp.ids, [(name, hook)])

    def record_resid(self, inp):
        _, cache = self.model.run_with_cache(inp.ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        return [cache[f"blocks.{l}.hook_resid_post"] for l in range(self.n_layer)]

    def sweep(self, ids, heads, a, b):
        """TransformerLens' idiom: a `run_with_hooks` loop, one forward per head."""
        return self.loop_sweep(
            lambda layer, head: self._logits(ids, [(f"blocks.{layer}.attn.hook_z", _tl_hooks_zero(head))]),
            heads,
            a,
            b,
        )


class TL3(_TLBase):
    key, label = "tl3", "TransformerLens HookedTransformer"

    def __init__(self, tiny: bool = False):
        super().__init__(tiny)
        import warnings

        import transformer_lens
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

        self.version = _dist_version("transformer-lens")
        c = self.config
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer,
            d_model=c.n_embd,
            d_head=self.d_head,
            n_heads=c.n_head,
            d_mlp=4 * c.n_embd,
            d_vocab=c.vocab_size,
            n_ctx=c.n_positions,
            act_fn="gelu_new",
            normalization_type="LN",
            eps=c.layer_norm_epsilon,
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.9 announces its own removal in 4.0
            self.model = HookedTransformer(cfg)
        # TL's own GPT-2 conversion; no LayerNorm folding or centring, so logits equal HF's
        self.model.load_and_process_state_dict(
            convert_gpt2_weights(self.hf, cfg),
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
            refactor_factored_attn_matrices=False,
        )
        self.model.eval()
        del transformer_lens


class TL4(_TLBase):
    key, label = "tl4", "TransformerLens TransformerBridge"

    def __init__(self, tiny: bool = False):
        super().__init__(tiny)
        from transformer_lens.model_bridge import TransformerBridge

        self.version = _dist_version("transformer-lens")
        wrapped = C.build_hf(tiny)  # the bridge switches the model it wraps to eager attention
        self.model = TransformerBridge.boot_transformers(
            "gpt2", hf_model=wrapped, tokenizer=C.make_tokenizer(self.config.vocab_size)
        )
        self.model.eval()


# ---------------------------------------------------------------------------------------------
# nnsight


class NNsight(Library):
    key, label = "nnsight", "nnsight"

    def __init__(self, tiny: bool = False):
        super().__init__(tiny)
        import nnsight
        from nnsight.modeling.transformers import TransformersModel

        self.version = _dist_version("nnsight")
        self.nnsight = nnsight
        wrapped = C.build_hf(tiny)  # nnsight replaces the submodules' forward on the model it wraps
        self.lm = TransformersModel(wrapped, tokenizer=C.make_tokenizer(self.config.vocab_size))
        self.h = self.lm.transformer.h

    def zero_head(self, inp):
        d, head = self.d_head, self.head
        with self.lm.trace(inp.ids):
            self.h[C.ZERO_LAYER].attn.c_proj.input[..., head * d : (head + 1) * d] = 0
            logits = self.lm.output.logits.save()
        return logits

    def scale_mlp(self, inp):
        with self.lm.trace(inp.ids):
            mlp = self.h[C.SCALE_LAYER].mlp
            mlp.output = mlp.output * C.SCALE
            logits = self.lm.output.logits.save()
        return logits

    def add_last(self, inp):
        with self.lm.trace(inp.ids):
            self.h[C.ADD_LAYER].output[:, -1] += inp.v  # transformers 5: a decoder layer returns a tensor
            logits = self.lm.output.logits.save()
        return logits

    def patch_pos(self, inp):
        """Two invokes in one trace (one batched forward): the source prompts' rows are read,
        the edited rows written; the barrier makes the read happen before the write."""
        block = self.h[C.PATCH_LAYER]
        with self.lm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(inp.other):
                source = block.input[:, C.PATCH_POS]
                barrier()
            with tracer.invoke(inp.ids):
                barrier()
                block.input[:, C.PATCH_POS] = source
                logits = self.lm.output.logits.save()
        return logits

    def record_resid(self, inp):
        saved = []
        with self.lm.trace(inp.ids):
            for l in range(self.n_layer):
                saved.append(self.h[l].output.save())
        return saved

    heads_per_trace = 4  # invokes batched into one forward; 4 x 16 rows keeps the logits ~400 MB

    def sweep(self, ids, heads, a, b):
        """nnsight's idiom for many variants: several invokes (batched rows) per trace."""
        d, values = self.d_head, []
        for start in range(0, len(heads), self.heads_per_trace):
            chunk = heads[start : start + self.heads_per_trace]
            saved = []
            with self.lm.trace() as tracer:
                for layer, head in chunk:
                    with tracer.invoke(ids):
                        self.h[layer].attn.c_proj.input[..., head * d : (head + 1) * d] = 0
                        last = self.lm.output.logits[:, -1]
                        saved.append((last[:, a] - last[:, b]).mean().save())
            values += [float(v) for v in saved]
        return values


# ---------------------------------------------------------------------------------------------
# pyvene


class Pyvene(Library):
    key, label = "pyvene", "pyvene"

    def __init__(self, tiny: bool = False):
        super().__init__(tiny)
        import pyvene as pv

        self.pv = pv
        self.version = _dist_version("pyvene")
        self.wrapped = C.build_hf(tiny)
        self._models = {}

    def _model(self, key, representations):
        """IntervenableModels are built once per configuration (outside the timed call)."""
        if key not in self._models:
            config = self.pv.IntervenableConfig(representations=representations)
            self._models[key] = self.pv.IntervenableModel(config, self.wrapped)
            self._models[key].disable_model_gradients()
        return self._models[key]

    def _zero_model(self, layer):
        return self._model(
            ("zero", layer),
            [
                {
                    "layer": layer,
                    "component": "head_attention_value_output",
                    "unit": "h.pos",
                    "intervention_type": self.pv.ZeroIntervention,
                }
            ],
        )

    def _zero(self, ids, layer, head):
        batch, seq = ids.shape
        model = self._zero_model(layer)
        _, out = model(
            {"input_ids": ids}, unit_locations={"base": [[[[head]] * batch, [list(range(seq))] * batch]]}
        )  # [heads, positions]
        return out.logits

    def zero_head(self, inp):
        return self._zero(inp.ids, C.ZERO_LAYER, self.head)

    def scale_mlp(self, inp):
        model = self._model(
            "scale",
            [
                {
                    "layer": C.SCALE_LAYER,
                    "component": "mlp_output",
                    "intervention": lambda base, source=None, **kw: base * C.SCALE,
                }
            ],
        )
        _, out = model({"input_ids": inp.ids})
        return out.logits

    def add_last(self, inp):
        batch, seq = inp.ids.shape
        model = self._model(
            "add",
            [
                {
                    "layer": C.ADD_LAYER,
                    "component": "block_output",
                    "intervention_type": self.pv.AdditionIntervention,
                }
            ],
        )
        _, out = model(
            {"input_ids": inp.ids},
            source_representations=inp.v,
            unit_locations={"base": [[[seq - 1]] * batch]},
        )
        return out.logits

    def patch_pos(self, inp):
        batch = inp.ids.shape[0]
        model = self._model(
            "patch",
            [
                {
                    "layer": C.PATCH_LAYER,
                    "component": "block_input",
                    "intervention_type": self.pv.VanillaIntervention,
                }
            ],
        )
        where = [[[C.PATCH_POS]] * batch]
        _, out = model(
            {"input_ids": inp.ids},
            [{"input_ids": inp.other}],
            unit_locations={"sources->base": (where, where)},
        )
        return out.logits

    def record_resid(self, inp):
        batch, seq = inp.ids.shape
        model = self._model(
            "record",
            [
                {
                    "layer": l,
                    "component": "block_output",
                    "intervention_type": self.pv.CollectIntervention,
                    "max_number_of_units": seq,
                }  # default 1 would collect 1/seq of d_model
                for l in range(self.n_layer)
            ],
        )
        positions = [[list(range(seq))] * batch] * self.n_layer
        (_, collected), _ = model({"input_ids": inp.ids}, unit_locations={"base": positions})
        return [t.reshape(batch, seq, -1) for t in collected]

    def sweep(self, ids, heads, a, b):
        """pyvene's loop: one IntervenableModel per layer, one call per head."""
        return self.loop_sweep(lambda layer, head: self._zero(ids, layer, head), heads, a, b)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


PEERS = {"tl3": TL3, "tl4": TL4, "nnsight": NNsight, "pyvene": Pyvene}
ALL = {"bare": Bare, "hand": HandHooks, "splice": Splice, **PEERS}
