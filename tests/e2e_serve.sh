#!/usr/bin/env bash
# e2e_serve.sh - tprun --serve: the OpenAI-compatible HTTP server.
#
# The model: tpsynth's demo preset (Qwen3 shape, hidden 128, 2 layers) with
# the real Qwen3 tokenizer (tests/data/qwen3-tokenizer), converted at tp 1
# and 2.  The fixture models of tests/models/ have no tokenizer, and the
# text endpoints need one.
#
#   - curl: every endpoint, streamed and not; greedy answers identical to
#     `tprun --prompt-ids/--prompt [--chat] --json` for the same prompt; stop
#     strings; finish_reason "length" at max_tokens and at --max-seq; errors
#     (malformed JSON, wrong types, out-of-range values, a huge body, an
#     unknown route / model / method, n=2, a prompt past the context).
#   - a slow client sending its request byte by byte; a client that
#     disconnects mid-stream or before a non-streamed answer (with
#     --max-batch 1: the next request only runs when its slot was freed);
#     chunked bodies over the limit; a 70 kB header; 300 idle connections.
#   - a load test: 64 requests, 16 at a time, different prompts and lengths,
#     each answer identical to the same prompt run alone.
#   - the openai Python package (PyPI, in a venv under $BUILD) at tp 1 and at
#     tp 2 under mpirun: chat and completions, streamed and not.  Without
#     network the package cannot be installed: the script then ends with
#     SKIP (exit 77) once everything else passed.
#   - SIGTERM mid-load: every request answered, exit 0; kill -9 of rank 1
#     (tp 2 over tcp): the running request gets 503 and rank 0 exits
#     non-zero within --timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
BUILD=${BUILD:-build}
for prog in tpsynth tpconvert tprun; do
    [ -x "$BIN/$prog" ] || { echo "e2e_serve: $BIN/$prog not built"; exit 1; }
done
command -v curl >/dev/null || { echo "e2e_serve: curl not found"; exit 1; }
tmp=$(mktemp -d)
bg_pids=()
cleanup() {
    for p in "${bg_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" || rm -rf "$tmp"
}
trap cleanup EXIT
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
ok() { echo "ok: $*"; }

"$BIN/tpsynth" --preset demo --tokenizer tests/data/qwen3-tokenizer/tokenizer.json.zst --quiet "$tmp/model"
"$BIN/tpconvert" --tp 1 --compress none --quiet "$tmp/model" "$tmp/tp1"
"$BIN/tpconvert" --tp 2 --compress none --quiet "$tmp/model" "$tmp/tp2"

port=$(( 20000 + (RANDOM % 5000) * 2 ))
server_pid=
# start_server OUT ARGS...: tprun --serve in the background on a fresh port
# ($port), waits for /health.  $server_pid is the process to signal.
start_server() {
    local out=$1; shift
    port=$((port + 1))
    "$BIN/tprun" "$out" --serve --port $port --verbose "$@" >"$tmp/server.out" 2>"$tmp/server.err" &
    server_pid=$!
    bg_pids+=($server_pid)
    wait_health || { cat "$tmp/server.err"; return 1; }
}
wait_health() {
    for _ in $(seq 1 1800); do   # a loaded machine can take minutes to load the model
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
stop_server() {   # SIGTERM; returns the server's exit status
    kill -TERM "$server_pid" 2>/dev/null || true
    local rc=0
    wait "$server_pid" || rc=$?
    return $rc
}
url() { echo "http://127.0.0.1:$port$1"; }
# post PATH JSON: the body on stdout, the status in $tmp/status
post() {
    curl -s -o "$tmp/body" -w '%{http_code}' -H 'Content-Type: application/json' -d "$2" "$(url "$1")" >"$tmp/status"
    cat "$tmp/body"
}
jq_py() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
expect_status() { # WANT WHAT
    local got
    got=$(cat "$tmp/status")
    [ "$got" = "$1" ] && ok "$2: $got" || fail "$2: status $got, expected $1: $(head -c 300 "$tmp/body")"
}

# ---------------------------------------------------------------- tp 1, curl
start_server "$tmp/tp1" --max-batch 4 --max-seq 160 || { fail "the server did not start"; exit 1; }

curl -s "$(url /v1/models)" >"$tmp/models"
[ "$(jq_py 'd["data"][0]["id"]' <"$tmp/models")" = tp1 ] && ok "/v1/models names tp1" || fail "/v1/models: $(cat "$tmp/models")"
[ "$(curl -s "$(url /health)" | jq_py 'd["status"]')" = ok ] && ok "/health" || fail "/health"

# Greedy, prompt as ids: the tokens tprun --prompt-ids gives.
ids="9707,11,1879,0,1207,374,264,1273"
"$BIN/tprun" "$tmp/tp1" --prompt-ids "$ids" --max-new-tokens 12 --temperature 0 --json --quiet >"$tmp/ref_ids.json"
want=$(jq_py '" ".join(map(str, d["generated_ids"]))' <"$tmp/ref_ids.json")
post /v1/completions "{\"model\": \"tp1\", \"prompt\": [$ids], \"max_tokens\": 12, \"temperature\": 0, \"return_token_ids\": true}" >"$tmp/c1"
expect_status 200 "completion with prompt ids"
got=$(jq_py '" ".join(map(str, d["choices"][0]["token_ids"]))' <"$tmp/c1")
[ "$got" = "$want" ] && ok "completion ids = tprun --prompt-ids ($got)" || fail "completion ids '$got', tprun '$want'"
[ "$(jq_py 'd["usage"]["prompt_tokens"], d["usage"]["completion_tokens"]' <"$tmp/c1")" = "8 12" ] &&
    ok "usage 8 + 12" || fail "usage: $(cat "$tmp/c1")"
[ "$(jq_py 'd["choices"][0]["finish_reason"]' <"$tmp/c1")" = length ] && ok "finish_reason length at max_tokens" ||
    fail "finish_reason: $(cat "$tmp/c1")"

# Text prompt and chat: the text tprun --prompt [--chat] gives.
"$BIN/tprun" "$tmp/tp1" --prompt "The capital of France is" --max-new-tokens 16 --temperature 0 --json --quiet >"$tmp/ref_text.json"
"$BIN/tprun" "$tmp/tp1" --prompt "Say hello." --chat --max-new-tokens 16 --temperature 0 --json --quiet >"$tmp/ref_chat.json"
post /v1/completions '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}' >"$tmp/c2"
expect_status 200 "completion with a text prompt"
[ "$(jq_py 'd["choices"][0]["text"]' <"$tmp/c2")" = "$(jq_py 'd["text"]' <"$tmp/ref_text.json")" ] &&
    ok "completion text = tprun --prompt" || fail "completion text differs: $(cat "$tmp/c2") vs $(cat "$tmp/ref_text.json")"
post /v1/chat/completions '{"model": "tp1", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}' >"$tmp/ch1"
expect_status 200 "chat completion"
[ "$(jq_py 'd["choices"][0]["message"]["content"]' <"$tmp/ch1")" = "$(jq_py 'd["text"]' <"$tmp/ref_chat.json")" ] &&
    ok "chat text = tprun --prompt --chat" || fail "chat text differs: $(cat "$tmp/ch1") vs $(cat "$tmp/ref_chat.json")"
[ "$(jq_py 'd["object"], d["choices"][0]["message"]["role"]' <"$tmp/ch1")" = "chat.completion assistant" ] &&
    ok "chat object and role" || fail "chat shape: $(cat "$tmp/ch1")"

# Streamed: SSE chunks ending in [DONE], the same text.
curl -sN -H 'Content-Type: application/json' -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}' "$(url /v1/completions)" >"$tmp/s1"
python3 - "$tmp/s1" "$tmp/c2" <<'EOF' && ok "streamed completion = non-streamed, usage chunk, [DONE]" || fail "streamed completion: $(head -c 600 "$tmp/s1")"
import json, sys
events = [l[6:] for l in open(sys.argv[1]).read().split("\n") if l.startswith("data: ")]
assert events[-1] == "[DONE]", events[-1]
chunks = [json.loads(e) for e in events[:-1]]
text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
whole = json.load(open(sys.argv[2]))
assert text == whole["choices"][0]["text"], (text, whole)
assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"], chunks[-1]
assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
EOF
curl -sN -H 'Content-Type: application/json' -d '{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0, "stream": true}' "$(url /v1/chat/completions)" >"$tmp/s2"
python3 - "$tmp/s2" "$tmp/ch1" <<'EOF' && ok "streamed chat: role first, deltas = non-streamed" || fail "streamed chat: $(head -c 600 "$tmp/s2")"
import json, sys
events = [l[6:] for l in open(sys.argv[1]).read().split("\n") if l.startswith("data: ")]
assert events[-1] == "[DONE]"
chunks = [json.loads(e) for e in events[:-1]]
assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
assert text == json.load(open(sys.argv[2]))["choices"][0]["message"]["content"]
assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
EOF

# Stop strings: cut at the first occurrence, not included.
full=$(jq_py 'd["choices"][0]["text"]' <"$tmp/c2")
stop=$(python3 -c 'import sys; t=sys.argv[1]; print(t[len(t)//2:len(t)//2+3])' "$full")
post /v1/completions "$(python3 -c 'import json,sys; print(json.dumps({"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stop": ["zzzz-never", sys.argv[1]]}))' "$stop")" >"$tmp/c3"
python3 - "$tmp/c3" "$full" "$stop" <<'EOF' && ok "stop string cuts the text" || fail "stop: $(cat "$tmp/c3") (full '$full', stop '$stop')"
import json, sys
d = json.load(open(sys.argv[1])); full, stop = sys.argv[2], sys.argv[3]
assert d["choices"][0]["text"] == full[:full.index(stop)], d
assert d["choices"][0]["finish_reason"] == "stop"
EOF

# --max-seq: prompt 150 ids + answer stop at 160 positions with "length".
long=$(python3 -c 'print(",".join(str(100 + i) for i in range(150)))')
post /v1/completions "{\"prompt\": [$long], \"max_tokens\": 100, \"temperature\": 0}" >"$tmp/c4"
[ "$(jq_py 'd["choices"][0]["finish_reason"], d["usage"]["completion_tokens"]' <"$tmp/c4")" = "length 11" ] &&
    ok "finish_reason length at --max-seq (11 tokens after 150)" || fail "max-seq: $(cat "$tmp/c4")"

# Errors: OpenAI JSON, the right status, the server stays up.
err_case() { # STATUS WHAT PATH BODY [PARAM]
    post "$3" "$4" >/dev/null
    expect_status "$1" "$2"
    python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; assert e["message"] and e["type"] and "code" in e and "param" in e
if len(sys.argv) > 2: assert e["param"] == sys.argv[2], e' "$tmp/body" ${5:-} || fail "$2: not an OpenAI error: $(cat "$tmp/body")"
}
err_case 400 "malformed JSON" /v1/completions '{"prompt": "x",'
err_case 400 "body not an object" /v1/completions '[1, 2]'
err_case 400 "max_tokens a string" /v1/completions '{"prompt": "x", "max_tokens": "ten"}' max_tokens
err_case 400 "temperature out of range" /v1/completions '{"prompt": "x", "temperature": 5}' temperature
err_case 400 "top_p 0" /v1/completions '{"prompt": "x", "top_p": 0}' top_p
err_case 400 "max_tokens 0" /v1/completions '{"prompt": "x", "max_tokens": 0}' max_tokens
err_case 400 "n 2" /v1/completions '{"prompt": "x", "n": 2}' n
err_case 400 "stop a number" /v1/completions '{"prompt": "x", "stop": 3}' stop
err_case 400 "prompt id outside the vocabulary" /v1/completions '{"prompt": [1, 99999999]}' prompt
err_case 400 "prompt missing" /v1/completions '{"max_tokens": 3}' prompt
err_case 400 "prompt past the context" /v1/completions "{\"prompt\": [$long,$long]}" prompt
err_case 400 "messages not a list" /v1/chat/completions '{"messages": "hi"}' messages
err_case 400 "stream not a bool" /v1/chat/completions '{"messages": [{"role": "user", "content": "hi"}], "stream": 1}' stream
err_case 404 "unknown model" /v1/completions '{"model": "gpt-4", "prompt": "x"}' model
err_case 404 "unknown route" /v1/nothing '{}'
python3 -c 'print("{\"prompt\": \"" + "a" * (2 << 20) + "\"}")' >"$tmp/huge.json"
curl -s -o "$tmp/body" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary @"$tmp/huge.json" "$(url /v1/completions)" >"$tmp/status" || true
expect_status 413 "a 2 MiB body"
# Chunked, the body has no Content-Length: read to its end without being
# kept, then 413; one that never ends is cut off (after 4 times the limit).
curl -s -o "$tmp/body" -w '%{http_code}' -H 'Content-Type: application/json' -H 'Transfer-Encoding: chunked' \
    --data-binary @"$tmp/huge.json" "$(url /v1/completions)" >"$tmp/status" || true
expect_status 413 "a 2 MiB chunked body"
python3 - $port <<'EOF' && ok "an endless chunked body: the connection is closed" || fail "endless chunked body"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
t0, sent = time.time(), 0
try:
    while time.time() - t0 < 60:
        s.sendall(chunk)
        sent += 65536
except (BrokenPipeError, ConnectionResetError):
    assert sent < (16 << 20), sent   # 4 MiB and what the socket buffers held
    sys.exit(0)
sys.exit("still reading after %d bytes" % sent)
EOF
curl -s -o "$tmp/body" -w '%{http_code}' -H "X-Big: $(head -c 70000 /dev/zero | tr '\0' a)" "$(url /health)" \
    >"$tmp/status" || true
expect_status 431 "a 70 kB header"
curl -s -o "$tmp/body" -w '%{http_code}' "$(url /v1/completions)" >"$tmp/status"
expect_status 405 "GET /v1/completions"
post /v1/completions '{"prompt": "x", "max_tokens": 2, "future_field": {"a": 1}}' >/dev/null
expect_status 200 "unknown fields tolerated"

# A slow client: its request a byte at a time.
python3 - $port <<'EOF' && ok "a request sent byte by byte" || fail "slow client"
import json, socket, sys, time
body = json.dumps({"prompt": [9707, 11], "max_tokens": 3, "temperature": 0}).encode()
req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
       b"Content-Length: %d\r\n\r\n" % len(body)) + body
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for b in req:
    s.send(bytes([b])); time.sleep(0.003)
data = b""
while True:
    d = s.recv(65536)
    if not d: break
    data += d
head, _, rest = data.partition(b"\r\n\r\n")
assert head.startswith(b"HTTP/1.1 200"), head
assert json.loads(rest)["usage"]["completion_tokens"] == 3
EOF

curl -s "$(url /metrics)" >"$tmp/metrics"
for m in 'tpshard_requests_total{status="200"}' 'tpshard_requests_total{status="400"}' tpshard_prompt_tokens_total \
         tpshard_generation_tokens_total tpshard_queue_length tpshard_running_requests \
         'tpshard_time_to_first_token_seconds_bucket{le="+Inf"}' tpshard_inter_token_latency_seconds_count; do
    grep -qF "$m" "$tmp/metrics" || fail "/metrics lacks $m"
done
[ "$(awk '/^tpshard_requests_total\{status="413"\}/ {print $2}' "$tmp/metrics")" = 2 ] && ok "/metrics counts the two 413s" ||
    fail "/metrics: $(grep requests_total "$tmp/metrics")"

# The load test: 64 prompts, each alone first, then 16 at a time.
python3 - $port <<'EOF' && ok "load: 64 requests, 16 at a time, each = its answer alone" || fail "load test"
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url = "http://127.0.0.1:%s/v1/completions" % sys.argv[1]
def ask(i):
    prompt = [100 + (i * 7 + j * 13) % 5000 for j in range(3 + (i * 5) % 40)]
    body = {"prompt": prompt, "max_tokens": 4 + i % 13, "temperature": 0, "return_token_ids": True}
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        d = json.load(r)
    c = d["choices"][0]
    assert c["prompt_token_ids"] == prompt, i
    return c["token_ids"]
alone = [ask(i) for i in range(64)]
with ThreadPoolExecutor(16) as ex:
    together = list(ex.map(ask, range(64)))
bad = [i for i in range(64) if alone[i] != together[i]]
assert not bad, "answers differ for %s" % bad
EOF

# Many idle connections whose headers never end: libmicrohttpd's connection
# limit (256, a thread each) bounds them, the rest wait in the listen
# backlog; once they close, the server answers again and its threads go.
python3 - $port "$server_pid" <<'EOF' && ok "300 idle connections: at most 256 threads, all gone after" || fail "idle connections"
import socket, sys, time, urllib.request
port, pid = int(sys.argv[1]), int(sys.argv[2])
def threads():
    return int([l for l in open("/proc/%d/status" % pid) if l.startswith("Threads:")][0].split()[1])
base = threads()
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
for s in socks:
    s.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
time.sleep(1)
peak = threads()
assert peak <= base + 256, (base, peak)
for s in socks:
    s.close()
t0 = time.time()
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5).read()
        break
    except OSError:
        assert time.time() - t0 < 30, "no answer after the idle connections closed"
        time.sleep(0.1)
while threads() > base and time.time() - t0 < 30:
    time.sleep(0.1)
assert threads() <= base, (base, peak, threads())
EOF

stop_server && ok "SIGTERM: exit 0" || fail "SIGTERM: exit $?"

# ---------------------------------------------- --max-step-tokens
# Prompts fed 3 tokens a step, two requests at once: the same greedy answers
# as tprun --prompt-ids.
start_server "$tmp/tp1" --max-batch 2 --max-seq 160 --max-step-tokens 3 || fail "the server did not start (--max-step-tokens 3)"
ids2=$(python3 -c 'print(",".join(str(300 + 7 * i) for i in range(40)))')
"$BIN/tprun" "$tmp/tp1" --prompt-ids "$ids2" --max-new-tokens 6 --temperature 0 --json --quiet >"$tmp/ref_ids2.json"
want2=$(jq_py '" ".join(map(str, d["generated_ids"]))' <"$tmp/ref_ids2.json")
curl_pids=()
for k in 1 2; do
    curl -s -H 'Content-Type: application/json' -o "$tmp/step$k" \
        -d "{\"prompt\": [$ids2], \"max_tokens\": 6, \"temperature\": 0, \"return_token_ids\": true}" "$(url /v1/completions)" &
    curl_pids+=($!)
done
wait "${curl_pids[@]}" || true
for k in 1 2; do
    got2=$(jq_py '" ".join(map(str, d["choices"][0]["token_ids"]))' <"$tmp/step$k" 2>/dev/null)
    [ "$got2" = "$want2" ] && ok "--max-step-tokens 3: request $k = tprun --prompt-ids" ||
        fail "--max-step-tokens 3: request $k '$got2', tprun '$want2'"
done
stop_server && ok "SIGTERM: exit 0 (--max-step-tokens 3)" || fail "SIGTERM (--max-step-tokens 3): exit $?"

# ---------------------------------------------- clients gone mid-answer
start_server "$tmp/tp1" --max-batch 1 --max-seq 4096 || fail "the server did not start (max-batch 1)"
python3 - $port <<'EOF' && ok "a client gone mid-stream frees its slot" || fail "disconnect mid-stream"
import json, socket, sys, time, urllib.request
port = int(sys.argv[1])
body = json.dumps({"prompt": [9707], "max_tokens": 250, "stream": True, "temperature": 0}).encode()
s = socket.create_connection(("127.0.0.1", port))
s.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
got = b""
while b"data: " not in got:   # the headers may come alone first
    d = s.recv(4096)
    assert d, got
    got += d
s.close()   # gone with ~249 tokens to go: the one slot must come free
req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port,
                             json.dumps({"prompt": [11], "max_tokens": 2}).encode(), {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    assert json.load(r)["usage"]["completion_tokens"] == 2
EOF
grep -q "stream closed before the end\|client gone" "$tmp/server.err" && ok "the server logged the disconnect" ||
    fail "no disconnect in the log: $(tail -5 "$tmp/server.err")"

# Not streamed: the thread waiting for the answer notices the client left
# (its tokens wake it at every step; it must still look) and frees the one
# slot, so the next request runs long before the 4000 tokens of the first.
python3 - $port <<'EOF' && ok "a non-streamed client gone frees its slot" || fail "disconnect before a non-streamed answer"
import json, re, socket, sys, time, urllib.request
port = int(sys.argv[1])
def generated():
    m = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port).read().decode()
    return float(re.search(r"^tpshard_generation_tokens_total (\S+)", m, re.M).group(1))
before = generated()
body = json.dumps({"prompt": [9707], "max_tokens": 4000, "temperature": 0}).encode()
s = socket.create_connection(("127.0.0.1", port))
s.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
time.sleep(0.5)
s.close()
req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port,
                             json.dumps({"prompt": [11], "max_tokens": 2}).encode(), {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    assert json.load(r)["usage"]["completion_tokens"] == 2
done = generated() - before
assert done < 4000, "the first request ran to its end (%d tokens) before the next" % done
EOF
grep -q "client gone before the answer" "$tmp/server.err" && ok "the server logged the non-streamed disconnect" ||
    fail "no non-streamed disconnect in the log: $(tail -5 "$tmp/server.err")"

# ---------------------------------------------- SIGTERM mid-load
python3 - $port "$server_pid" <<'EOF' && ok "SIGTERM mid-load: every request answered" || fail "SIGTERM mid-load"
import json, os, signal, sys, threading, time, urllib.request, urllib.error
port, pid = int(sys.argv[1]), int(sys.argv[2])
results = [None] * 8
def ask(i):
    req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port,
                                 json.dumps({"prompt": [100 + i], "max_tokens": 6}).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            results[i] = r.status
    except urllib.error.HTTPError as e:
        results[i] = e.code
threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
for t in threads: t.start()
time.sleep(0.3)
os.kill(pid, signal.SIGTERM)
for t in threads: t.join()
assert all(r in (200, 503) for r in results), results
assert results.count(200) >= 1, results
EOF
rc=0; wait "$server_pid" || rc=$?
[ $rc -eq 0 ] && ok "SIGTERM mid-load: exit 0" || fail "SIGTERM mid-load: exit $rc: $(tail -3 "$tmp/server.err")"

# ---------------------------------------------- rank 1 dies (tp 2, tcp)
port=$((port + 1)); mport=$((port + 1000))
for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$mport \
        "$BIN/tprun" "$tmp/tp2" --serve --port $port --quiet --timeout 5 >"$tmp/r$r.out" 2>"$tmp/r$r.err" &
    eval "rank$r=$!"; bg_pids+=($!)
done
server_pid=$rank0
if wait_health; then
    rm -f "$tmp/body"
    curl -s -o "$tmp/body" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d '{"prompt": [9707], "max_tokens": 5000, "temperature": 0}' "$(url /v1/completions)" >"$tmp/status" &
    cpid=$!
    sleep 1
    t0=$SECONDS
    kill -9 "$rank1"
    wait $cpid || true
    expect_status 503 "the running request when rank 1 died"
    rc=0; timeout 30 tail --pid="$rank0" -f /dev/null || true; wait "$rank0" || rc=$?
    [ $rc -ne 0 ] && [ $((SECONDS - t0)) -le 10 ] && ok "rank 0 exits $rc within the timeout" ||
        fail "rank 0 after rank 1 died: exit $rc after $((SECONDS - t0)) s"
else
    fail "tp 2 (tcp) server did not start: $(cat "$tmp/r0.err")"
fi

# ---------------------------------------------- the openai package
venv=$BUILD/venv-serve
openai_skip=
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" && timeout 300 "$venv/bin/pip" install -q openai; } >"$tmp/pip.log" 2>&1; then
        openai_skip="pip install openai failed (no network?): $(tail -1 "$tmp/pip.log")"
    fi
fi
openai_check() { # OUT NAME: chat and completions, streamed and not, against tprun's greedy answers
    "$venv/bin/python" - $port "$2" "$tmp/ref_text.json" "$tmp/ref_chat.json" <<'EOF'
import json, sys
from openai import OpenAI
port, name = sys.argv[1], sys.argv[2]
ref_text = json.load(open(sys.argv[3]))["text"]
ref_chat = json.load(open(sys.argv[4]))["text"]
c = OpenAI(base_url="http://127.0.0.1:%s/v1" % port, api_key="none")
assert [m.id for m in c.models.list()] == [name]
r = c.completions.create(model=name, prompt="The capital of France is", max_tokens=16, temperature=0)
assert r.choices[0].text == ref_text, (r.choices[0].text, ref_text)
assert r.usage.completion_tokens > 0
s = c.completions.create(model=name, prompt="The capital of France is", max_tokens=16, temperature=0, stream=True)
assert "".join(ch.choices[0].text for ch in s if ch.choices) == ref_text
msgs = [{"role": "user", "content": "Say hello."}]
r = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0)
assert r.choices[0].message.content == ref_chat, (r.choices[0].message.content, ref_chat)
s = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0, stream=True,
                              stream_options={"include_usage": True})
chunks = list(s)
assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref_chat
assert chunks[-1].usage.completion_tokens > 0
try:
    c.completions.create(model="nope", prompt="x")
    raise SystemExit("no error for an unknown model")
except Exception as e:
    assert getattr(e, "status_code", None) == 404, e
EOF
}
if [ -z "$openai_skip" ]; then
    start_server "$tmp/tp1" --max-batch 4 --served-model-name tiny-qwen || fail "the server did not start (openai tp 1)"
    openai_check "$tmp/tp1" tiny-qwen && ok "openai package at tp 1" || fail "openai package at tp 1"
    stop_server || fail "openai tp 1: server exit $?"
    if command -v mpirun >/dev/null; then
        port=$((port + 1))
        mpirun --allow-run-as-root --oversubscribe -np 2 "$BIN/tprun" "$tmp/tp2" --serve --port $port --quiet \
            >"$tmp/mpi.out" 2>"$tmp/mpi.err" &
        server_pid=$!; bg_pids+=($server_pid)
        if wait_health; then
            openai_check "$tmp/tp2" tp2 && ok "openai package at tp 2 under mpirun" || fail "openai package at tp 2 (mpirun)"
        else
            fail "the mpirun server did not start: $(tail -5 "$tmp/mpi.err")"
        fi
        # SIGTERM to rank 0 (mpirun itself answers SIGTERM by killing the job):
        # rank 0 stops the other rank and every process exits 0.
        r0=
        for p in $(pgrep -P "$server_pid"); do
            tr '\0' '\n' <"/proc/$p/environ" | grep -q '^OMPI_COMM_WORLD_RANK=0$' && r0=$p
        done
        [ -n "$r0" ] && kill -TERM "$r0"
        rc=0; wait "$server_pid" || rc=$?
        [ -n "$r0" ] && [ $rc -eq 0 ] && ok "mpirun: SIGTERM to rank 0, exit 0" || fail "mpirun server: rank 0 '$r0', exit $rc"
    else
        fail "mpirun not found (tools/install-deps.sh installs openmpi-bin)"
    fi
fi

if [ $fails -ne 0 ]; then
    echo "e2e_serve: $fails failed"
    exit 1
fi
if [ -n "$openai_skip" ]; then
    echo "SKIP: the openai package checks: $openai_skip"
    exit 77
fi
echo "e2e_serve: all passed"
