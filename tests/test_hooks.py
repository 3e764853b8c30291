"""difftrack.hooks: the SDPA interception and processor wrapping shared by capture and CAG."""
import torch
import torch.nn.functional as F

from difftrack.hooks import SDPAIntercept, processor_wrapper_class, track_grid, unwrap_processor


def _qkv(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, 4, generator=g) for _ in range(3)]


def _two_calls(q, k, v):
    a = F.scaled_dot_product_attention(q, k, v)
    b = F.scaled_dot_product_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    return a, b


def test_an_observer_sees_the_first_call_and_changes_nothing():
    q, k, v = _qkv()
    seen = []
    with SDPAIntercept(lambda call: seen.append((call["query"], call["key"]))) as mode:
        a, b = _two_calls(q, k, v)
    ref = _two_calls(q, k, v)
    assert torch.equal(a, ref[0]) and torch.equal(b, ref[1])
    assert mode.handled == 1 and len(seen) == 1 and seen[0][0] is q and seen[0][1] is k


def test_a_replacement_takes_the_first_matching_call_only_and_its_own_sdpa_runs_plainly():
    """``match`` picks the call (here the 3-token one, the second); the callback's own SDPA call is not
    intercepted (the mode is off inside its handler); keyword and positional arguments are bound by name."""
    q, k, v = _qkv()
    inner = []

    def fn(call):
        inner.append(call["value"].shape[2])
        return F.scaled_dot_product_attention(call["query"], call["key"], call["value"]) * 0 - 1

    with SDPAIntercept(fn, match=lambda c: c["query"].shape[2] == 3) as mode:
        a, b = _two_calls(q, k, v)
        c = F.scaled_dot_product_attention(query=q[:, :, :3], key=k[:, :, :3], value=v[:, :, :3])
    assert mode.handled == 1 and inner == [3]
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(b, torch.full_like(b, -1.0))
    assert torch.equal(c, F.scaled_dot_product_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3]))  # only the first


class _Proc:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
        return hidden_states + 1


class _Wrapper:
    def __init__(self, inner, tag):
        self.inner, self.tag = inner, tag

    def _run(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * 2


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.processor = _Proc()

    def set_processor(self, p):
        self.processor = p


def test_wrappers_declare_the_wrapped_signature_and_come_off_in_any_order():
    import inspect

    cls = processor_wrapper_class(_Wrapper, _Proc, "Test")
    assert cls is processor_wrapper_class(_Wrapper, _Proc, "Test")  # cached
    assert list(inspect.signature(cls.__call__).parameters) == list(inspect.signature(_Proc.__call__).parameters)
    attn = _Attn()
    base = attn.processor
    w1 = cls(base, 1)
    attn.set_processor(w1)
    w2 = processor_wrapper_class(_Wrapper, type(w1), "Test")(w1, 2)
    attn.set_processor(w2)
    x = torch.ones(2)
    assert torch.equal(attn.processor(attn, x), (x + 1) * 4)
    assert unwrap_processor(attn, w1)  # the inner one first: w2 now wraps the base
    assert attn.processor is w2 and w2.inner is base
    assert unwrap_processor(attn, w2) and attn.processor is base
    assert not unwrap_processor(attn, w2)  # gone already: nothing touched
    assert attn.processor is base


def test_track_grid_reads_every_call():
    class M(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    class A:
        @staticmethod
        def grid(module, args, kwargs):
            return kwargs.get("hidden_states", args[0] if args else None).shape

    m, seen = M(), []
    h = track_grid(m, A, seen.append)
    m(torch.zeros(2, 3))
    m(hidden_states=torch.zeros(4))
    h.remove()
    m(torch.zeros(1))
    assert seen == [torch.Size([2, 3]), torch.Size([4])]
