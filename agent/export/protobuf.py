"""The protobuf exposition format: metric families as length-delimited MetricFamily messages.

Prometheus asks for it in its Accept header when native histograms are enabled, and only this
format carries native histograms. The messages are built and serialized by the protobuf runtime
from the compiled ``metrics.proto``; this module only maps families onto them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import NativeHistogram as NativeSample
from prometheus_client.samples import Sample

from agent.export import metrics_pb2 as pb

CONTENT_TYPE = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)
_PROTO = "application/vnd.google.protobuf"


def accepts_protobuf(accept: str) -> bool:
    """Whether an Accept header asks for the delimited MetricFamily format.

    Prometheus sends it first, with a higher q-value than text, when protobuf scraping is on;
    any other client (a browser, curl, an older server) gets the text format.
    """
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        if fields[0].lower() != _PROTO:
            continue
        params = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        if (
            params.get("proto") == "io.prometheus.client.MetricFamily"
            and params.get("encoding") == "delimited"
            and params.get("q") != "0"
        ):
            return True
    return False


_TYPES = {
    "counter": pb.COUNTER,
    "gauge": pb.GAUGE,
    "summary": pb.SUMMARY,
    "histogram": pb.HISTOGRAM,
    "gaugehistogram": pb.GAUGE_HISTOGRAM,
    "info": pb.GAUGE,
    "stateset": pb.GAUGE,
    "unknown": pb.UNTYPED,
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def label_bytes(labels: dict[str, str]) -> bytes:
    """A Metric holding just these label pairs, serialized: merged into each sample's Metric
    (protobuf merges concatenated messages), so a series' labels are built once, not per
    sample. Sorted by name, as Prometheus' own clients send them."""
    out: bytes = pb.Metric(
        label=[pb.LabelPair(name=k, value=labels[k]) for k in sorted(labels)]
    ).SerializeToString()
    return out


def family(name: str, help_text: str, kind: str) -> pb.MetricFamily:
    """An empty family: ``name`` as the samples carry it (a counter's with _total)."""
    return pb.MetricFamily(name=name, help=help_text, type=_TYPES.get(kind, pb.UNTYPED))


def fill_histogram(
    h: pb.Histogram,
    bounds: Sequence[float],
    counts: Sequence[int],
    total: float,
    native: NativeSample | None,
) -> None:
    """Classic buckets from per-bucket ``counts`` (the last one +Inf), and the native ones."""
    acc = 0
    for bound, n in zip(bounds, counts, strict=False):
        acc += n
        h.bucket.add(cumulative_count=acc, upper_bound=bound)
    h.sample_count = acc + counts[-1]
    h.sample_sum = total
    if native is not None:
        _native(h, native)


def _native(h: pb.Histogram, nh: NativeSample) -> None:
    h.schema = nh.schema
    h.zero_threshold = nh.zero_threshold
    h.zero_count = int(nh.zero_count)
    for span in nh.pos_spans or ():
        h.positive_span.add(offset=span.offset, length=span.length)
    h.positive_delta.extend(nh.pos_deltas or ())
    for span in nh.neg_spans or ():
        h.negative_span.add(offset=span.offset, length=span.length)
    h.negative_delta.extend(nh.neg_deltas or ())


def frame(msg: pb.MetricFamily) -> bytes:
    """One family of the delimited stream: its length as a varint, then the message."""
    body: bytes = msg.SerializeToString()
    return _varint(len(body)) + body


def _labels(msg: pb.Metric, labels: dict[str, str], skip: str = "") -> None:
    for name in sorted(labels):
        if name != skip:
            msg.label.add(name=name, value=labels[name])


def _key(labels: dict[str, str], skip: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != skip))


def _histogram(family: Metric, kind: int) -> Iterable[pb.Metric]:
    """One Metric per label set: the classic buckets, count and sum samples grouped together,
    and the native buckets where a sample carries them."""
    groups: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], list[Sample]]] = {}
    for s in family.samples:
        skip = "le" if s.name.endswith("_bucket") else ""
        key = _key(s.labels, skip)
        groups.setdefault(key, ({k: v for k, v in s.labels.items() if k != skip}, []))[1].append(s)
    for labels, samples in groups.values():
        m = pb.Metric()
        _labels(m, labels)
        h = m.histogram
        for s in samples:
            nh = s.native_histogram
            if nh is not None:
                h.sample_count = int(nh.count_value)
                h.sample_sum = nh.sum_value
                _native(h, nh)
            elif s.name.endswith("_bucket"):
                bound = float(s.labels["le"])
                if not math.isinf(bound):  # the +Inf bucket is the count
                    h.bucket.add(cumulative_count=int(s.value), upper_bound=bound)
            elif s.name.endswith("_count") or s.name.endswith("_gcount"):
                h.sample_count = int(s.value)
            elif s.name.endswith("_sum") or s.name.endswith("_gsum"):
                h.sample_sum = s.value
        yield m


def _summary(family: Metric) -> Iterable[pb.Metric]:
    groups: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], list[Sample]]] = {}
    for s in family.samples:
        key = _key(s.labels, "quantile")
        labels = {k: v for k, v in s.labels.items() if k != "quantile"}
        groups.setdefault(key, (labels, []))[1].append(s)
    for labels, samples in groups.values():
        m = pb.Metric()
        _labels(m, labels)
        for s in samples:
            if s.name.endswith("_count"):
                m.summary.sample_count = int(s.value)
            elif s.name.endswith("_sum"):
                m.summary.sample_sum = s.value
            elif "quantile" in s.labels:
                m.summary.quantile.add(quantile=float(s.labels["quantile"]), value=s.value)
        yield m


def family_message(family: Metric) -> pb.MetricFamily:
    kind = _TYPES.get(family.type, pb.UNTYPED)
    name = family.name
    if family.type == "counter":
        # The text format adds _total to a counter's samples; here the family carries the
        # sample name, as Prometheus reads it.
        name += "_total"
    elif family.type == "info":
        name += "_info"
    msg = pb.MetricFamily(name=name, help=family.documentation, type=kind)
    if family.type in ("histogram", "gaugehistogram"):
        msg.metric.extend(_histogram(family, kind))
    elif family.type == "summary":
        msg.metric.extend(_summary(family))
    else:
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            m = msg.metric.add()
            _labels(m, s.labels)
            if kind == pb.COUNTER:
                m.counter.value = s.value
            elif kind == pb.GAUGE:
                m.gauge.value = s.value
            else:
                m.untyped.value = s.value
    return msg


def encode(families: Iterable[Metric]) -> bytes:
    """The delimited stream: each MetricFamily preceded by its length as a varint."""
    return b"".join(frame(family_message(f)) for f in families if f.samples)
