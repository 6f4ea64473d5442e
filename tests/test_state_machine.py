"""A Hypothesis state machine over contexts: open and close edit and record contexts (in any
order), change live registries, run forwards (some raising inside an `Apply`), alone or with a
second thread running its own edits at the same time. After every step, what splice computed must
equal an independent computation with hand-written torch hooks; with nothing open no splice hook
may remain; at the end the clean forward must be bit-identical to the one before."""

import threading

import handhooks
import pytest
import torch
from conftest import build
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import splice

# Sites on distinct modules, so hand hooks compose the way splice's plan does (per site, edits in
# opening order), and hand functions for the interventions drawn below.
SITES = [
    "blocks.0.mlp.out",
    "blocks.0.attn.z",
    "blocks.1.attn.out",
    "blocks.1.resid_post",
    "blocks.2.resid_pre",
]
HEADS = 4  # query heads of the smaller of the two families below (GPT-2: 4, Llama: 6)
SEQ = 6


class Boom(Exception):
    pass


def interventions(site):
    scalars = st.sampled_from([0.5, -1.0, 2.0])
    options = [
        st.builds(lambda f: ("scale", f), scalars),
        st.builds(lambda c: ("add", c), scalars),
        st.builds(lambda p: ("zero_pos", p), st.integers(0, SEQ - 1)),
    ]
    if site.endswith("attn.z"):
        options.append(st.builds(lambda h: ("zero_head", h), st.integers(0, HEADS - 1)))
    return st.one_of(options)


def as_splice(spec):
    kind, value = spec
    return {
        "scale": lambda: splice.Scale(value),
        "add": lambda: splice.Add(value),
        "zero_pos": lambda: splice.Zero(pos=value),
        "zero_head": lambda: splice.Zero(heads=value),
    }[kind]()


def as_hand(spec):
    """The same edit on the site tensor, written by hand (t is a clone; heads already split)."""
    kind, value = spec

    def edit(t):
        if kind == "scale":
            return t * value
        if kind == "add":
            return t + value
        if kind == "zero_pos":
            t[:, value] = 0
        else:
            t[:, :, value] = 0
        return t

    return edit


def hand_forward(hf, family, ids, edits, record_sites=()):
    """Logits (and site tensors) with `edits` [(site, spec)] applied by hand hooks, in order per
    site, computed in a fresh thread: a context with nothing of splice open, so splice's own hooks
    (installed for the main thread's open contexts) do nothing there."""
    result = {}

    def work():
        by_site = {}
        for site, spec in edits:
            by_site.setdefault(site, []).append(as_hand(spec))
        recorded = {}

        def composed(site):
            def fn(t):
                for edit in by_site.get(site, []):
                    t = edit(t)
                if site in record_sites:
                    recorded[site] = t.clone()
                return t

            return fn

        handles = [
            handhooks.register(hf, family, site, composed(site)) for site in set(by_site) | set(record_sites)
        ]
        try:
            with torch.no_grad():
                result["logits"] = hf(ids).logits
        finally:
            for handle in handles:
                handle.remove()
        result["recorded"] = recorded

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result["logits"], result["recorded"]


class Contexts(RuleBasedStateMachine):
    family = "llama"

    @initialize()
    def setup(self):
        self.hf = build(self.family)
        self.model = splice.Model(self.hf)
        self.ids = torch.randint(1, 90, (2, SEQ), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.clean = self.hf(self.ids).logits
        self.open = []  # [kind, context manager, live registry or recording, {site: spec} or [sites]]

    # -- opening and closing -------------------------------------------------------------------
    @precondition(lambda self: len(self.open) < 4)
    @rule(data=st.data(), site=st.sampled_from(SITES))
    def open_edit(self, data, site):
        spec = data.draw(interventions(site))
        cm = self.model.edit({site: as_splice(spec)})
        live = cm.__enter__()
        self.open.append(["edit", cm, live, {site: spec}])

    @precondition(lambda self: len(self.open) < 4)
    @rule(sites=st.lists(st.sampled_from(SITES), min_size=1, max_size=3, unique=True))
    def open_record(self, sites):
        cm = self.model.record(sites)
        rec = cm.__enter__()
        self.open.append(["record", cm, rec, sites])

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close_any(self, data):
        """Close any open context, not only the innermost (an ExitStack can do this)."""
        index = data.draw(st.integers(0, len(self.open) - 1))
        _, cm, _, _ = self.open.pop(index)
        cm.__exit__(None, None, None)

    @precondition(lambda self: any(kind == "edit" for kind, *_ in self.open))
    @rule(data=st.data(), site=st.sampled_from(SITES))
    def change_live_registry(self, data, site):
        entry = data.draw(st.sampled_from([e for e in self.open if e[0] == "edit"]))
        spec = data.draw(interventions(site))
        entry[2][site] = as_splice(spec)
        entry[3][site] = spec

    @precondition(lambda self: any(e[0] == "edit" and e[3] for e in self.open))
    @rule(data=st.data())
    def delete_from_live_registry(self, data):
        entry = data.draw(st.sampled_from([e for e in self.open if e[0] == "edit" and e[3]]))
        site = data.draw(st.sampled_from(sorted(entry[3])))
        del entry[2][site]
        del entry[3][site]

    # -- forwards ------------------------------------------------------------------------------
    def expected_edits(self):
        return [
            (site, spec) for kind, _, _, specs in self.open if kind == "edit" for site, spec in specs.items()
        ]

    def recorded_sites(self):
        return sorted({site for kind, _, _, sites in self.open if kind == "record" for site in sites})

    @rule()
    def forward(self):
        with torch.no_grad():
            got = self.hf(self.ids).logits
        expected, recorded = hand_forward(
            self.hf, self.family, self.ids, self.expected_edits(), self.recorded_sites()
        )
        assert torch.equal(got, expected)
        for kind, _, rec, sites in self.open:
            if kind == "record":
                for site in sites:
                    assert torch.equal(rec[site], recorded[site])  # head sites arrive split by head

    @rule(site=st.sampled_from(SITES))
    def forward_raising_inside_apply(self, site):
        def boom(t):
            raise Boom(site)

        with pytest.raises(Boom):
            with torch.no_grad():
                self.model.run(self.ids, edits={site: splice.Apply(boom)})

    @rule(data=st.data(), site=st.sampled_from(SITES))
    def forward_beside_another_thread(self, data, site):
        """This thread forwards under its open contexts while another runs `m.run` with an edit of
        its own, started together: neither may see the other's edits."""
        spec = data.draw(interventions(site))
        barrier = threading.Barrier(2)
        out = {}

        def other():
            barrier.wait()
            with torch.no_grad():
                for _ in range(5):
                    out.setdefault("other", []).append(
                        self.model.run(self.ids, edits={site: as_splice(spec)})[0]
                    )

        thread = threading.Thread(target=other)
        thread.start()
        barrier.wait()
        with torch.no_grad():
            mine = [self.hf(self.ids).logits for _ in range(5)]
        thread.join()
        expected_mine, _ = hand_forward(self.hf, self.family, self.ids, self.expected_edits())
        expected_other, _ = hand_forward(self.hf, self.family, self.ids, [(site, spec)])
        assert all(torch.equal(m, expected_mine) for m in mine)
        assert len(out["other"]) == 5 and all(torch.equal(o, expected_other) for o in out["other"])

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def no_hooks_when_nothing_is_open(self):
        if not getattr(self, "open", None):
            assert self.model.hook_count == 0 if hasattr(self, "model") else True

    def teardown(self):
        if not hasattr(self, "model"):
            return
        for _, cm, _, _ in reversed(self.open):
            cm.__exit__(None, None, None)
        assert self.model.hook_count == 0
        with torch.no_grad():
            assert torch.equal(self.hf(self.ids).logits, self.clean)


SETTINGS = settings(
    max_examples=20, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class ContextsGPT2(Contexts):
    family = "gpt2"


TestContextsLlama = Contexts.TestCase
TestContextsLlama.settings = SETTINGS
TestContextsGPT2 = ContextsGPT2.TestCase
TestContextsGPT2.settings = SETTINGS
