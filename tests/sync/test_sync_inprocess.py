"""Sender and receivers in one process (receivers in threads) over real TCP / shm sockets.

Covers name mapping into fused layouts, the adapter hooks, timeouts and errors.
Cross-process behaviour (training, failures, restarts) is in test_sync_processes.py.
"""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
import torch
from torch import nn

from stalwart.sync import (
    CallbackAdapter,
    Ignore,
    NameMapper,
    Prefix,
    SchemaError,
    ShmTransport,
    Split,
    SyncError,
    TcpTransport,
    WeightSyncReceiver,
    WeightSyncSender,
)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


class HFBlock(nn.Module):
    """Hugging Face Llama-style names: separate q/k/v and gate/up projections, tied embeddings."""

    def __init__(self, d=32, kv=16, ff=48, vocab=50):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(d, d, bias=True)
        layer.self_attn.k_proj = nn.Linear(d, kv, bias=True)
        layer.self_attn.v_proj = nn.Linear(d, kv, bias=True)
        layer.self_attn.o_proj = nn.Linear(d, d, bias=False)
        layer.mlp = nn.Module()
        layer.mlp.gate_proj = nn.Linear(d, ff, bias=False)
        layer.mlp.up_proj = nn.Linear(d, ff, bias=False)
        layer.mlp.down_proj = nn.Linear(ff, d, bias=False)
        self.model.layers = nn.ModuleList([layer])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied

    def forward(self, tok):
        x = self.model.embed_tokens(tok)
        a = self.model.layers[0].self_attn
        x = x + a.o_proj(a.q_proj(x) * a.k_proj(x).repeat(1, 1, 2) + a.v_proj(x).repeat(1, 1, 2))
        m = self.model.layers[0].mlp
        x = x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
        return self.lm_head(x)


class VllmBlock(nn.Module):
    """vLLM-style fused layout: qkv_proj and gate_up_proj."""

    def __init__(self, d=32, kv=16, ff=48, vocab=50):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = nn.Linear(d, d + 2 * kv, bias=True)
        layer.self_attn.o_proj = nn.Linear(d, d, bias=False)
        layer.mlp = nn.Module()
        layer.mlp.gate_up_proj = nn.Linear(d, 2 * ff, bias=False)
        layer.mlp.down_proj = nn.Linear(ff, d, bias=False)
        self.model.layers = nn.ModuleList([layer])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 50, (2, 8), generator=g)
    model(tok).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


class Receivers:
    """Run ``receive()`` in threads, one call per ``run()``."""

    def __init__(self, receivers):
        self.receivers = receivers
        self.results = {}

    def run(self, fn):
        errs = []

        def go(i, r):
            try:
                self.results[i] = r.receive(timeout=30)
            except Exception as e:  # surfaced in the main thread
                errs.append(e)

        ths = [threading.Thread(target=go, args=(i, r)) for i, r in enumerate(self.receivers)]
        for t in ths:
            t.start()
        out = fn()
        for t in ths:
            t.join(60)
        if errs:
            raise errs[0]
        return out


@pytest.fixture
def tcp():
    closers = []
    yield closers
    for c in reversed(closers):
        c.close()


def test_hf_to_vllm_fused_layout_bitwise(tcp):
    torch.manual_seed(0)
    trainer = HFBlock().to(torch.bfloat16)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    sender = WeightSyncSender(trainer, TcpTransport("127.0.0.1", 0), num_receivers=1, bucket_bytes=1 << 16)
    tcp.append(sender)
    rollout = VllmBlock().to(torch.bfloat16)
    rcv = WeightSyncReceiver(
        rollout, TcpTransport("127.0.0.1", sender.transport.port), name_map=NameMapper.hf_to_vllm()
    )
    tcp.append(rcv)
    rs = Receivers([rcv])
    for step in range(3):
        train_step(trainer, opt, step)
        st = rs.run(sender.sync)
        assert rs.results[0].version == st.version
        t, r = trainer.model.layers[0], rollout.model.layers[0]
        qkv_w = torch.cat([t.self_attn.q_proj.weight, t.self_attn.k_proj.weight, t.self_attn.v_proj.weight])
        qkv_b = torch.cat([t.self_attn.q_proj.bias, t.self_attn.k_proj.bias, t.self_attn.v_proj.bias])
        assert bits_equal(r.self_attn.qkv_proj.weight.detach(), qkv_w.detach())
        assert bits_equal(r.self_attn.qkv_proj.bias.detach(), qkv_b.detach())
        gu = torch.cat([t.mlp.gate_proj.weight, t.mlp.up_proj.weight])
        assert bits_equal(r.mlp.gate_up_proj.weight.detach(), gu.detach())
        assert bits_equal(r.mlp.down_proj.weight.detach(), t.mlp.down_proj.weight.detach())
        assert bits_equal(rollout.lm_head.weight.detach(), trainer.lm_head.weight.detach())  # tied, sent once
    assert st.update_bytes < st.model_bytes  # later syncs are deltas


def test_split_and_prefix_rules(tcp):
    """Trainer with DDP-style 'module.' names and a fused qkv -> receiver with separate q/k/v."""
    torch.manual_seed(1)
    fused = VllmBlock()
    trainer_state = {
        "module." + k: v.detach().clone() for k, v in fused.state_dict().items() if "lm_head" not in k
    }
    sender = WeightSyncSender(trainer_state, TcpTransport("127.0.0.1", 0), num_receivers=1)
    tcp.append(sender)
    rollout = HFBlock()
    mapper = NameMapper(
        Prefix("module.", ""),
        Split(
            r"^(?P<pre>.*)\.qkv_proj\.(?P<kind>weight|bias)$",
            ["{pre}.q_proj.{kind}", "{pre}.k_proj.{kind}", "{pre}.v_proj.{kind}"],
        ),
        Split(r"^(?P<pre>.*)\.gate_up_proj\.weight$", ["{pre}.gate_proj.weight", "{pre}.up_proj.weight"]),
    )
    rcv = WeightSyncReceiver(rollout, TcpTransport("127.0.0.1", sender.transport.port), name_map=mapper)
    tcp.append(rcv)
    rs = Receivers([rcv])
    for step in range(2):
        trainer_state["module.model.layers.0.self_attn.qkv_proj.weight"][step::5] += 0.5
        rs.run(sender.sync)
        w = trainer_state["module.model.layers.0.self_attn.qkv_proj.weight"]
        a = rollout.model.layers[0].self_attn
        assert bits_equal(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), w)
        gu = trainer_state["module.model.layers.0.mlp.gate_up_proj.weight"]
        m = rollout.model.layers[0].mlp
        assert bits_equal(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), gu)


def test_callback_adapter_gets_changed_tensors(tcp):
    torch.manual_seed(2)
    trainer = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    mirror = {k: torch.zeros_like(v) for k, v in trainer.state_dict().items()}
    pushed = []
    sender = WeightSyncSender(trainer, TcpTransport("127.0.0.1", 0), num_receivers=1)
    tcp.append(sender)
    rcv = WeightSyncReceiver(
        CallbackAdapter(mirror, lambda v, items: pushed.append((v, [n for n, _ in items]))),
        TcpTransport("127.0.0.1", sender.transport.port),
    )
    tcp.append(rcv)
    rs = Receivers([rcv])
    rs.run(sender.sync)
    assert pushed[-1] == (1, sorted(mirror))
    with torch.no_grad():
        trainer[1].bias[3] += 1
    rs.run(sender.sync)
    assert pushed[-1] == (2, ["1.bias"])  # only the tensor that changed is handed to the engine
    assert all(bits_equal(mirror[k], v) for k, v in trainer.state_dict().items())


def test_schema_mismatch_is_a_clear_error(tcp, caplog):
    sender = WeightSyncSender(nn.Linear(4, 4), TcpTransport("127.0.0.1", 0), num_receivers=1, ack_timeout=20)
    tcp.append(sender)
    rcv = WeightSyncReceiver(
        nn.Linear(4, 5), TcpTransport("127.0.0.1", sender.transport.port), receiver_id="bad"
    )
    tcp.append(rcv)
    errors = []

    def recv():
        try:
            rcv.receive(timeout=20)
        except SchemaError as e:
            errors.append(e)

    th = threading.Thread(target=recv)
    th.start()
    with pytest.raises(
        SyncError,
        match=r"receiver bad at .* cannot apply this model: .*'weight' has shape \[4, 4\], receiver 'weight' has \[5, 4\]",
    ):
        sender.sync()
    th.join(30)
    assert errors and "shape" in str(errors[0])
    assert sender.baseline_version is None


def test_ignore_and_dtype_mismatch():
    from stalwart.sync.schema import Schema, TensorSpec

    schema = Schema(
        [TensorSpec("a", torch.bfloat16, (4,)), TensorSpec("rotary.inv_freq", torch.float32, (2,))]
    )
    targets = {"a": torch.zeros(4, dtype=torch.float16)}
    with pytest.raises(SchemaError, match=r"'a' is torch.bfloat16 but receiver tensor 'a' is torch.float16"):
        NameMapper(Ignore(r"inv_freq")).map_schema(schema, targets)
    targets = {"a": torch.zeros(4, dtype=torch.bfloat16)}
    segs = NameMapper(Ignore(r"inv_freq")).map_schema(schema, targets)
    assert segs[1] == [] and segs[0][0].length == 4
    with pytest.raises(SchemaError, match="no such receiver tensor"):
        NameMapper().map_schema(schema, targets)


def test_fuse_rule_checks_sizes():
    from stalwart.sync.schema import Schema, TensorSpec

    schema = Schema(
        [TensorSpec(f"l.{p}_proj.weight", torch.float32, (r, 4)) for p, r in (("q", 4), ("k", 2), ("v", 2))]
    )
    good = {"l.qkv_proj.weight": torch.zeros(8, 4)}
    segs = NameMapper.hf_to_vllm().map_schema(schema, good)
    assert [s[0].dst_off for s in segs] == [0, 16, 24]
    with pytest.raises(SchemaError, match="have 8 rows, receiver tensor has 9"):
        NameMapper.hf_to_vllm().map_schema(schema, {"l.qkv_proj.weight": torch.zeros(9, 4)})


def test_receive_timeout_returns_none_and_missing_receiver_fails_sync(tcp):
    sender = WeightSyncSender(
        nn.Linear(4, 4), TcpTransport("127.0.0.1", 0), num_receivers=2, connect_timeout=1.0
    )
    tcp.append(sender)
    rcv = WeightSyncReceiver(nn.Linear(4, 4), TcpTransport("127.0.0.1", sender.transport.port))
    tcp.append(rcv)
    assert rcv.receive(timeout=0.2) is None
    with pytest.raises(SyncError, match="only 1 of 2 receivers connected"):
        sender.sync()
    assert sender.baseline_version is None


def test_unreachable_sender_is_a_transport_error():
    from stalwart.sync import TransportError

    with pytest.raises(TransportError, match="cannot reach the sender within"):
        WeightSyncReceiver(nn.Linear(2, 2), TcpTransport("127.0.0.1", 1, connect_timeout=0.5))


def test_shm_many_buckets_and_name_clash(caplog):
    name = f"t-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(3)
    trainer = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    sender = WeightSyncSender(
        trainer, ShmTransport(name), num_receivers=2, bucket_bytes=1 << 16, chunk_words=2048
    )
    try:
        with pytest.raises(Exception, match="another sender already uses this name"):
            ShmTransport(name).open_sender(frame_bytes=1 << 16)
        models = [nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]) for _ in range(2)]
        rcvs = [WeightSyncReceiver(m, ShmTransport(name)) for m in models]
        rs = Receivers(rcvs)
        with caplog.at_level(logging.INFO, logger="stalwart.sync"):
            st = rs.run(sender.sync)
        assert st.buckets > 2  # more buckets than slots: slots are recycled after RELEASE
        for m in models:
            assert all(
                bits_equal(a, b) for a, b in zip(trainer.state_dict().values(), m.state_dict().values())
            )
        for r in rcvs:
            r.close()
    finally:
        sender.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("baseline", ["host", "device"])
def test_cuda_sender_and_receiver(tcp, baseline):
    """Trainer and rollout models on the GPU: diff on the device (or host), apply in place on the device."""
    torch.manual_seed(4)
    trainer = HFBlock().cuda()
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-5)
    sender = WeightSyncSender(
        trainer, TcpTransport("127.0.0.1", 0), num_receivers=1, dtype=torch.bfloat16, baseline=baseline
    )
    tcp.append(sender)
    rollout = VllmBlock().to(torch.bfloat16).cuda()
    rcv = WeightSyncReceiver(
        rollout, TcpTransport("127.0.0.1", sender.transport.port), name_map=NameMapper.hf_to_vllm()
    )
    tcp.append(rcv)
    rs = Receivers([rcv])
    for step in range(3):
        train_step(trainer, opt, step)
        st = rs.run(sender.sync)
        a = trainer.model.layers[0].self_attn
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().to(torch.bfloat16)
        assert bits_equal(rollout.model.layers[0].self_attn.qkv_proj.weight.detach(), qkv)
    assert 0 < st.changed_elements < st.total_elements


@pytest.mark.parametrize("how", ["in_place", "reallocated"])
def test_receiver_weights_changed_behind_its_back(tcp, caplog, how):
    """An engine that overwrites or reallocates its weights (e.g. sleep/wake) is caught by the
    digest check and resynced, never left silently wrong."""
    torch.manual_seed(5)
    trainer = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).to(torch.bfloat16)
    sender = WeightSyncSender(trainer, TcpTransport("127.0.0.1", 0), num_receivers=1)
    tcp.append(sender)
    rollout = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).to(torch.bfloat16)
    rcv = WeightSyncReceiver(rollout, TcpTransport("127.0.0.1", sender.transport.port), receiver_id="eng")
    tcp.append(rcv)
    rs = Receivers([rcv])
    rs.run(sender.sync)
    with torch.no_grad():
        if how == "in_place":
            rollout[0].weight.zero_()
        else:
            rollout[0].weight.data = torch.zeros_like(rollout[0].weight)
        trainer[1].bias[0] += 1  # a small delta that does not touch layer 0
    with caplog.at_level(logging.WARNING, logger="stalwart.sync"):
        st = rs.run(sender.sync)
    assert st.resyncs == 1 and rs.results[0].attempts == 2
    assert "weights differ from the trainer's after applying it: 0.weight" in caplog.text
    assert all(bits_equal(a, b) for a, b in zip(trainer.state_dict().values(), rollout.state_dict().values()))


def test_full_sync_sends_only_the_tensors_a_receiver_lacks(tcp):
    """Receivers that already hold (some of) the trainer's weights get only the others: a rollout
    loaded from the same checkpoint costs digests, not a second copy of the model."""
    import copy

    torch.manual_seed(6)
    trainer = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(torch.bfloat16)
    same = copy.deepcopy(trainer)
    one_off = copy.deepcopy(trainer)
    with torch.no_grad():
        one_off[1].weight[3, 3] += 1
    sender = WeightSyncSender(trainer, TcpTransport("127.0.0.1", 0), num_receivers=2)
    tcp.append(sender)
    rcvs = [WeightSyncReceiver(m, TcpTransport("127.0.0.1", sender.transport.port)) for m in (same, one_off)]
    tcp.extend(rcvs)
    rs = Receivers(rcvs)
    st = rs.run(sender.sync)
    assert st.full_syncs == 2 and st.full_tensors == 1 and st.changed_elements == 64 * 64
    assert rs.results[0].bytes_received < 2000  # digests of 4 tensors, no weights
    assert 64 * 64 * 2 < rs.results[1].bytes_received < 64 * 64 * 2 + 2000  # 1.weight only
    assert st.wire_bytes < 0.6 * st.model_bytes  # a full broadcast would send 2x the model
    for m in (same, one_off):
        assert all(bits_equal(a, b) for a, b in zip(trainer.state_dict().values(), m.state_dict().values()))


def test_delta_verifies_tensors_the_receiver_ignores(tcp):
    """A delta carries only the whole-model digest, plus digests of changed tensors some receiver
    does not hold, so a receiver with Ignore rules still verifies every version."""
    torch.manual_seed(7)
    trainer = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    sender = WeightSyncSender(trainer, TcpTransport("127.0.0.1", 0), num_receivers=1)
    tcp.append(sender)
    rollout = {k: torch.zeros_like(v) for k, v in trainer.state_dict().items() if k != "0.bias"}
    rcv = WeightSyncReceiver(
        rollout, TcpTransport("127.0.0.1", sender.transport.port), name_map=NameMapper(Ignore(r"^0\.bias$"))
    )
    tcp.append(rcv)
    rs = Receivers([rcv])
    rs.run(sender.sync)
    for step in range(3):
        with torch.no_grad():
            trainer[0].bias[step] += 1  # ignored by the receiver
            trainer[1].weight[step, 0] += 1
        st = rs.run(sender.sync)
        assert st.resyncs == 0 and rs.results[0].mode == "delta" and rs.results[0].attempts == 1
        assert bits_equal(rollout["1.weight"], trainer[1].weight.detach())
