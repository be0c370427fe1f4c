"""``ferry``: submit a request file as a job, follow its events, print the result.

    ferry submit request.json            # tokens on stderr as they come, the body on stdout
    ferry submit request.json --detach   # print the job object and leave
    ferry watch JOB_ID | ferry status JOB_ID | ferry cancel JOB_ID
    ferry batch requests.jsonl --endpoint /v1/embeddings -o output.jsonl   # the Batch API

A request file holds the body of an OpenAI request (the endpoint is told by its fields:
``messages`` chat, ``prompt`` completions, ``input`` embeddings) or a whole job
``{"endpoint", "body", "webhook"?}``. It talks to the server only through the HTTP API
(``--url`` or ``$FERRY_URL``, default http://127.0.0.1:8000), with ``--api-key`` or
``$FERRY_API_KEY`` when the server has keys. Ctrl-C stops watching, not the job. Exit
status: 0 if the job completed, 1 if it did not, 2 on a usage or HTTP error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterator

import requests

from web import cli_batch

ENDPOINTS = {"messages": "/v1/chat/completions", "prompt": "/v1/completions",
             "input": "/v1/embeddings"}


class CliError(Exception):
    pass


def load_job(path: str, endpoint: str | None, webhook: str | None) -> dict:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    data = json.loads(text)
    job = data if "body" in data and "endpoint" in data else {"body": data}
    if endpoint:
        job["endpoint"] = endpoint
    if "endpoint" not in job:
        found = [ep for field, ep in ENDPOINTS.items() if field in job["body"]]
        if len(found) != 1:
            raise CliError("cannot tell the endpoint from the request; pass --endpoint")
        job["endpoint"] = found[0]
    if webhook:
        job["webhook"] = webhook
    return job


def session(api_key: str | None) -> requests.Session:
    """Every request of one run goes through this, with the key if there is one."""
    http = requests.Session()
    if api_key:
        http.headers["Authorization"] = f"Bearer {api_key}"
    return http


def request_json(http: requests.Session, method: str, url: str, **kw) -> dict:
    r = http.request(method, url, timeout=30, **kw)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise CliError(f"HTTP {r.status_code}: {message}")
    return r.json()


def events(http: requests.Session, base: str, job_id: str,
           after: int = -1) -> Iterator[tuple[str, dict]]:
    """The job's events from after ``after``; reconnects (resuming at the last event seen)
    when the connection drops."""
    for attempt in range(6):
        try:
            headers = {"Last-Event-ID": str(after)} if after >= 0 else {}
            with http.get(f"{base}/v1/jobs/{job_id}/events", headers=headers, stream=True,
                          timeout=(10, 60)) as r:
                if r.status_code >= 400:
                    raise CliError(f"HTTP {r.status_code}: {r.text}")
                fields: dict[str, str] = {}
                for line in r.iter_lines(decode_unicode=True):
                    if line and not line.startswith(":"):
                        key, _, value = line.partition(": ")
                        fields[key] = value
                    elif not line and fields:
                        after = int(fields.get("id", after))
                        yield fields.get("event", "message"), json.loads(fields["data"])
                        if fields.get("event") in ("done", "failed", "error"):
                            return
                        fields = {}
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            time.sleep(min(2 ** attempt, 10))
    raise CliError("lost the connection to the server")


def follow(http: requests.Session, base: str, job_id: str, quiet: bool) -> None:
    for kind, data in events(http, base, job_id):
        if kind == "delta" and data["index"] == 0 and not quiet:
            print(data["text"], end="", file=sys.stderr, flush=True)
        elif kind == "error":
            print(f"\n{data['error']['message']}", file=sys.stderr)
    if not quiet:
        print(file=sys.stderr)


def report(job: dict) -> int:
    if job["status"] == "completed":
        print(json.dumps(job["result"], indent=2))
        return 0
    print(json.dumps(job, indent=2))
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ferry", description="Submit a request file to Ferry as "
                                "a job, follow its events, print the result.")
    p.add_argument("--url", default=os.environ.get("FERRY_URL", "http://127.0.0.1:8000"),
                   help="the server (default: $FERRY_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("FERRY_API_KEY"),
                   help="sent as 'Authorization: Bearer <key>' (default: $FERRY_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a request file as a job, follow it, print the result")
    s.add_argument("file", help="a JSON request body or job ('-': standard input)")
    s.add_argument("--endpoint", choices=sorted(set(ENDPOINTS.values())))
    s.add_argument("--webhook", help="POSTed the final job object when the job ends")
    s.add_argument("--detach", action="store_true", help="print the job object and leave")
    s.add_argument("--quiet", action="store_true", help="do not print tokens as they come")
    for name, text in (("watch", "follow a job's events, then print its result"),
                       ("status", "print a job object"), ("cancel", "cancel a job")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job_id")
        if name == "watch":
            c.add_argument("--quiet", action="store_true")
    b = sub.add_parser("batch", help="run a JSONL file as a batch, with a progress bar, "
                       "and download its output")
    b.add_argument("file", help="the batch input: one request per line (custom_id, method, "
                   "url, body)")
    b.add_argument("--endpoint", required=True, choices=sorted(set(ENDPOINTS.values())))
    b.add_argument("-o", "--output", help="where to write the output file (default: stdout)")
    b.add_argument("--errors", help="where to write the error file, if there is one")
    b.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks")
    args = p.parse_args(argv)
    base = args.url.rstrip("/")
    http = session(args.api_key)
    call = functools.partial(request_json, http)
    try:
        if args.command == "batch":
            return cli_batch.run(call, http, base, args.file, args.endpoint, args.output,
                                 args.errors, args.poll)
        if args.command == "status":
            print(json.dumps(call("GET", f"{base}/v1/jobs/{args.job_id}"), indent=2))
            return 0
        if args.command == "cancel":
            return report(call("POST", f"{base}/v1/jobs/{args.job_id}/cancel"))
        if args.command == "submit":
            job = call("POST", f"{base}/v1/jobs",
                       json=load_job(args.file, args.endpoint, args.webhook))
            if args.detach:
                print(json.dumps(job, indent=2))
                return 0
            job_id = job["id"]
            print(f"job {job_id}", file=sys.stderr)
        else:
            job_id = args.job_id
        try:
            follow(http, base, job_id, args.quiet)
        except KeyboardInterrupt:
            print(f"\nstopped watching; the job goes on: ferry status {job_id}", file=sys.stderr)
            return 1
        return report(call("GET", f"{base}/v1/jobs/{job_id}"))
    except (CliError, OSError, ValueError, requests.RequestException) as e:
        print(f"ferry: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
