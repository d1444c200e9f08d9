"""Flink's REST API, the few calls the launcher makes: find a job by name, cancel it
and wait until Flink says so, stop it with a savepoint.

Beam's job server cannot do these against a remote cluster: cancelling a Beam job
there interrupts the job server's client thread, and Flink's job goes on running
(``execution.shutdown-on-attached-exit`` is off). So the launcher asks Flink
itself, on the address ``--flink_master`` names.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

TERMINAL = ("CANCELED", "FAILED", "FINISHED", "SUSPENDED")


class FlinkRest:
    """``http://HOST:PORT`` of a Flink JobManager's REST service."""

    def __init__(self, address: str, timeout: float = 10.0):
        self.base = address if address.startswith("http") else f"http://{address}"
        self.timeout = timeout

    def call(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def answers(self) -> bool:
        try:
            self.call("/config")
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def jobs(self) -> list[dict]:
        """Every job Flink knows: ``{"id", "name", "state"}``."""
        return [{"id": j["jid"], "name": j["name"], "state": j["state"]}
                for j in self.call("/jobs/overview").get("jobs", [])]

    def job_named(self, name: str) -> dict | None:
        """The newest job called ``name`` (Beam's ``--job_name``)."""
        found = [j for j in self.call("/jobs/overview").get("jobs", []) if j["name"] == name]
        if not found:
            return None
        newest = max(found, key=lambda j: j["start-time"])
        return {"id": newest["jid"], "name": newest["name"], "state": newest["state"]}

    def state(self, job_id: str) -> str:
        return self.call(f"/jobs/{job_id}")["state"]

    def restarts(self, job_id: str) -> int:
        """How many times Flink has restarted the job (its ``numRestarts`` metric)."""
        found = self.call(f"/jobs/{job_id}/metrics?get=numRestarts")
        return int(float(found[0]["value"])) if found else 0

    def taskmanagers(self) -> list[dict]:
        return self.call("/taskmanagers").get("taskmanagers", [])

    def prometheus_names(self, job_id: str) -> set[str]:
        """The names Flink's Prometheus reporter gives the job's metrics, from the
        metric ids its REST API lists: ``flink_`` + the metric group's logical
        scope + ``_`` + the name, every character outside ``[a-zA-Z0-9:_]``
        made ``_`` (the reporter's rule; the scope's variables, such as the
        operator's name, become labels). Job metrics live on the JobManager
        (``flink_jobmanager_job_``); a vertex's ``<subtask>.<name>`` ids are
        task metrics and ``<subtask>.<operator>.<name>`` ones operator
        metrics (Beam's counters among them: ``RunSentiment_batches``)."""
        names = {_prometheus("jobmanager_job", m["id"])
                 for m in self.call(f"/jobs/{job_id}/metrics")}
        for vertex in self.call(f"/jobs/{job_id}")["vertices"]:
            for metric in self.call(f"/jobs/{job_id}/vertices/{vertex['id']}/metrics"):
                _, _, rest = metric["id"].partition(".")
                operator, dot, name = rest.rpartition(".")
                scope = "taskmanager_job_task_operator" if dot else "taskmanager_job_task"
                names.add(_prometheus(scope, name))
        return names

    def cancel(self, job_id: str, timeout_s: float = 60.0) -> str:
        """Cancels the job and waits until Flink says it ended; returns its state."""
        if self.state(job_id) not in TERMINAL:
            self.call(f"/jobs/{job_id}?mode=cancel", method="PATCH")
        return self.wait_terminal(job_id, timeout_s)

    def wait_terminal(self, job_id: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        state = self.state(job_id)
        while state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            state = self.state(job_id)
        return state

    def stop_with_savepoint(self, job_id: str, directory: str | None = None,
                            timeout_s: float = 120.0) -> str:
        """Flink's stop-with-savepoint: the sources stop, a savepoint is taken and
        the job ends FINISHED. Returns the savepoint's path."""
        body = {"drain": False}
        if directory:
            body["targetDirectory"] = directory
        trigger = self.call(f"/jobs/{job_id}/stop", method="POST", body=body)["request-id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.call(f"/jobs/{job_id}/savepoints/{trigger}")
            if status["status"]["id"] == "COMPLETED":
                operation = status.get("operation", {})
                if "failure-cause" in operation:
                    cause = operation["failure-cause"].get("stack-trace", "").splitlines()
                    raise RuntimeError(f"the savepoint of job {job_id} failed: "
                                       f"{cause[0] if cause else operation}")
                return operation["location"]
            time.sleep(0.5)
        raise TimeoutError(f"the savepoint of job {job_id} did not complete in {timeout_s:.0f}s")


def _prometheus(scope: str, name: str) -> str:
    return f"flink_{scope}_{re.sub(r'[^a-zA-Z0-9:_]', '_', name)}"
