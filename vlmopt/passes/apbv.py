"""APB-V — sequence-parallel prefill of long videos with approximate attention across hosts.

Paper: "Spava / APB-V", https://arxiv.org/abs/2601.21444 (official code ``thunlp/APB``, files
``*_spava`` / ``apbv``). Training-free, query-aware, lossy. The prompt's context (everything up to
the last visual token) is cut into an anchor and 2H blocks over H hosts (zigzag: host h holds
blocks h and 2H−1−h, see :mod:`vlmopt.distributed.plan`). In every decoder layer each block
attends the anchor, itself (causally) and a *passing block*: the keys/values the question's queries
ranked highest in every earlier block (``vlmopt::apbv_compress``, max-pool width ``pool``); the
question block attends the whole prompt exactly, merged over hosts by log-sum-exp; decoding attends
each host's cache and merges (:mod:`vlmopt.distributed.attention`).

Graph rewrite: the prefill gets one input ``apbv_plans`` (the per-row split, planned in eager Python
from the visual slots and the 2-D mask by :meth:`APBV.plan_inputs`, so it stays real when FLOPs are
counted on fake tensors) and every decoder layer becomes a stand-in
(:class:`~vlmopt.layers.attention_standin.AttentionStandIn`) running the layer's own projections,
rotary embedding, norms and MLP around the APB-V attention; the decode graph's layers become
stand-ins that merge the hosts' attentions. The text-only prefill is left alone (no visual context
to split). With no ``torch.distributed`` process group the H hosts are simulated in one process and
give the same numbers H processes give.

Position policy: every token keeps its global position id (1-D RoPE or M-RoPE), computed on the
whole sequence before the split; no token is dropped, so decoding continues at the prompt length.
Tiled images (LLaVA-NeXT / OneVision) are context like any visual tokens, base image, tiles and
newlines alike; the frame-parallel tower under ``torchrun`` is refused for them (an image's tiles are
packed together, so they cannot be encoded on different hosts), the one-process simulation runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmopt.errors import IncompatiblePassError
from vlmopt.passes.base import Pass, check_range


@dataclass(frozen=True)
class APBV(Pass):
    """APB-V over ``hosts`` hosts; lengths left None take the official defaults (l_a ≈ n/64,
    l_p ≈ n/128, rounded up to multiples of 128; see :mod:`vlmopt.distributed.plan`)."""

    stage: ClassVar[str] = "llm"
    query_aware: ClassVar[bool] = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2601.21444"

    hosts: int
    """Physical hosts H (processes of the group, or simulated in one process), ≥ 1."""
    anchor_len: int | None = None
    """Anchor tokens at the start of the context (None: 128·⌈(n // 64) / 128⌉), ≥ 0."""
    passing_len: int | None = None
    """Tokens each context block passes on per KV head (None: the official default), ≥ 0."""
    pool: int = 5
    """Max-pool width of the compressor's scores along the sequence (odd, ≥ 1)."""

    def __post_init__(self) -> None:
        check_range("APBV", "hosts", self.hosts, 1, 4096, integer=True)
        for name in ("anchor_len", "passing_len"):
            value = getattr(self, name)
            if value is not None:
                check_range("APBV", name, value, 0, 10**9, integer=True)
        check_range("APBV", "pool", self.pool, 1, 1023, odd="stride-1 pooling keeps the length")

    def check(self, adapter, before) -> None:
        super().check(adapter, before)
        if "sliding" in adapter.mask_kinds:
            raise IncompatiblePassError(
                "APBV replaces every layer's attention with anchor / passing-block attention over full causal "
                "context; sliding-window layers (this model has some) would attend differently: use a model whose "
                "layers all attend fully"
            )
        self.group_hosts()  # under a process group: hosts must equal its size (a clear error before tracing)
        for earlier in before:
            raise IncompatiblePassError(
                f"APBV plans its host split on the prompt as the processor made it, so it cannot follow "
                f"{type(earlier).__name__} ({earlier.stage} stage), which changes the LLM's tokens or attention; "
                "use APBV alone"
            )

    def plan_inputs(self, prompt, compiled) -> dict:
        """The row plans (:class:`~vlmopt.distributed.plan.HostPlan`) of a prefill with visual inputs;
        under a process group also this rank's frames: its share of the tower's inputs
        (``Adapter.frame_inputs``) and the :class:`~vlmopt.distributed.frames.FrameShare` that
        gathers the visual tokens."""
        if prompt.stage != "prefill":
            return {}
        from vlmopt.distributed.plan import plan_prompt

        inputs = {"apbv_plans": plan_prompt(prompt.inputs, self.hosts, self.anchor_len, self.passing_len)}
        group = self.group_hosts()
        built_for_group = any(n.op == "placeholder" and n.target == "apbv_frames" for n in compiled.stages["prefill"].graph.nodes)
        if built_for_group != (group is not None):
            where = ("inside", "outside") if built_for_group else ("outside", "inside")
            raise IncompatiblePassError(
                f"APBV was compiled {where[0]} a torch.distributed process group and now runs {where[1]} one; its "
                "graphs are built for one or the other: compile the model where it runs (after init_process_group, "
                "or after destroying the group to simulate the hosts in one process)"
            )
        if group is not None:
            from vlmopt.distributed.frames import FrameShare

            adapter = compiled.adapter
            share = FrameShare.plan(adapter.frame_tokens(prompt), self.hosts, group.rank)
            inputs |= adapter.frame_inputs(prompt, *share.encoded) | {"apbv_frames": share}
        return inputs

    def group_hosts(self):
        """The :class:`~vlmopt.distributed.group.GroupHosts` of the current process group, or None
        (no group: simulate the hosts in this process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        from vlmopt.distributed.group import GroupHosts

        return GroupHosts.current(self.hosts)

    def stage_failed(self, error: Exception) -> None:
        """Under a process group: publish this rank as the failed one, so the other ranks' errors
        name it (not when the error is itself another rank's failure seen here)."""
        from vlmopt.distributed.group import HostFailure

        group = self.group_hosts()
        if group is not None and not isinstance(error, HostFailure):
            group.announce_failure()

    def apply(self, graph) -> None:
        from vlmopt.layers.attention_standin import replace_attention
        from vlmopt.distributed.layers import APBVPrefill, HostMergedDecode
        from vlmopt.graph.edit import GraphEditor

        group = self.group_hosts()
        editor = GraphEditor(graph["prefill"])
        plan = editor.add_input("apbv_plans", role="apbv_plan", stage="llm")
        view = graph.adapter.decoder_view
        layers = replace_attention(editor, view, lambda index: APBVPrefill(self.pool, group), plan, "apbv")
        if group is not None:
            self.gather_frames(editor, group)
            self.keep_local_rows(editor, layers, plan, group.rank)
        editor.finish()
        decode = GraphEditor(graph["decode"])
        replace_attention(decode, view, lambda index: HostMergedDecode(group), decode.placeholder("attention_mask"), "apbv")
        decode.finish()

    @staticmethod
    def gather_frames(editor, group) -> None:
        """Under a process group: the tower runs on this rank's frames only (its inputs are planned
        so, :meth:`plan_inputs`), and the visual tokens are all-gathered before the merge."""
        from vlmopt.distributed.frames import FrameGather

        merge = editor.one("merge")
        tokens = editor.input_of(merge, "features")
        share = editor.add_input("apbv_frames", role="apbv_frames", stage="vision")
        editor.module.add_submodule("apbv_gather_frames", FrameGather(group))
        gathered = editor.insert_module(tokens, "apbv_gather_frames", (tokens, share), role="apbv_frames", stage="vision")
        editor.replace_uses(tokens, gathered, after=gathered)  # the merge, and DeepStack's features riding along

    @staticmethod
    def keep_local_rows(editor, layers, plan, rank: int) -> None:
        """Under a process group: from the first decoder layer on, run this rank's tokens only (hidden
        states, rotary cos/sin and DeepStack's injected features sliced by the plan; positions stay global)."""
        import operator

        from vlmopt.distributed.group import local_rows

        first = layers[0]
        hidden, cos, sin = first.args[:3]
        injected = editor.nodes("deepstack_scatter")
        order = editor.order()
        chain = editor.chain(max((hidden, cos, sin, plan, *injected), key=order.__getitem__))
        rows = chain(local_rows, hidden, cos, sin, plan, rank, *injected, role="apbv_plan", stage="llm", name="apbv_local_rows")
        names = ["hidden", "cos", "sin"] + [f"deepstack_{i}" for i in range(len(injected))]
        local = [chain(operator.getitem, rows, i, role="apbv_plan", stage="llm", name=f"apbv_local_{name}")
                 for i, name in enumerate(names)]
        first.update_arg(0, local[0])
        for layer in layers:
            layer.update_arg(1, local[1])
            layer.update_arg(2, local[2])
        for node, local_node in zip(injected, local[3:]):
            editor.replace_uses(node, local_node, after=local_node)
