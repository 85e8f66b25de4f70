"""Prometheus text from a server's ``/metrics``, read as numbers: for the tests and the
benchmarks that count what a server did."""

from __future__ import annotations

from typing import Any

Samples = dict[tuple[str, frozenset], float]


def scrape(text: str) -> Samples:
    """Prometheus text as {(sample name, labels but ``replica``): value}, with every sample
    labelled with the one ingress replica that served the scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [smp for fam in text_string_to_metric_families(text) for smp in fam.samples]
    assert len({smp.labels.get("replica") for smp in samples}) == 1
    return {(smp.name, frozenset((k, v) for k, v in smp.labels.items() if k != "replica")):
            smp.value for smp in samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels`` (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scraped_total(client: Any, name: str, **labels: str) -> float:
    """``name`` summed over every series whose labels include ``labels``, scraped now from the
    server ``client`` (an ``httpx.Client`` on its base URL) talks to."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape(client.get("/metrics").text).items()
               if n == name and want <= ls)
