"""Find anomalies in the metrics records: non-finite values, bounds, spikes, hangs; and
among torchrun's ranks, a straggler (``Stragglers``, fed from the ranks' heartbeats).

Cheap enough to run on every record the supervisor's loop takes (``ftrain.tail`` reads
them). ``Detectors`` turns records into at most one ``Anomaly`` each (``feed``) and watches the
  time since the last record (``check_hang``). What it watches is a ``DetectSpec``, built by
  ``policy`` from the ``detect:`` section (DESIGN §6).

The hang clock of one attempt, and the silence allowed in each state::

    start_attempt ─▶ STARTUP ──first step──▶ STEADY ──save_start──▶ SAVING
                     startup                 timeout ◀──save_end──  max(startup, timeout)

Any record of the current attempt is a heartbeat. A save stays SAVING until its
``save_end``, even while steps go on (the shim can save in the background, and the next
save waits for it without a line). The ``auto`` timeout is
``max(floor, factor × the longest step interval seen in steady state)``, leaving out the
interval before an attempt's first step and any interval that spans a save; until one
interval is known the startup allowance still applies. The learnt interval carries over
between attempts; the spike baselines and ``last_values`` do not (a restarted attempt may
begin again from a high loss).

Its modules: ``spec`` (the ``detect:`` section as values, and ``Anomaly``), ``spikes``
(the spike rule), ``stragglers`` (the ranks' step times), ``detectors`` (``Detectors``, every
watch over the records). None of them imports torch.
"""

from ftrain.detect.detectors import Detectors
from ftrain.detect.spec import (
    Anomaly,
    DetectSpec,
    HangSpec,
    NonfiniteSpec,
    SpikeSpec,
    StragglerSpec,
    ThresholdSpec,
    parse_duration,
)
from ftrain.detect.stragglers import Stragglers

__all__ = [
    "Anomaly",
    "DetectSpec",
    "Detectors",
    "HangSpec",
    "NonfiniteSpec",
    "SpikeSpec",
    "StragglerSpec",
    "Stragglers",
    "ThresholdSpec",
    "parse_duration",
]
