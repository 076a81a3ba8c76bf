"""A unary-call load from real gRPC clients (grpcio, the C core): threads on
channels of their own call /handoff.demo.Echo/Say in a closed loop until
stdin closes, then print one summary line of JSON on stdout.

    grpc_load.py ADDR THREADS

Every failure is kept with its status code and details. Messages are
encoded by hand (field 1, a string), so no generated stubs are needed.
"""
import json
import sys
import threading

import grpc

addr, threads = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
lock = threading.Lock()
stats = {"ok": 0, "failed": 0, "errors": [], "pids": set()}
DEADLINE_S = 10.0


def encode(message: bytes) -> bytes:
    return b"\x0a" + bytes([len(message)]) + message


def reply_pid(reply: bytes) -> int:
    """Field 2 (pid, a varint) of an EchoReply."""
    i = 0
    while i < len(reply):
        key = reply[i]
        i += 1
        if key & 7 == 2:  # length-delimited: skip it
            length = reply[i]
            i += 1 + length
            continue
        value, shift = 0, 0
        while True:
            byte = reply[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if key >> 3 == 2:
            return value
    return 0


def client(n: int) -> None:
    with grpc.insecure_channel(addr) as channel:
        say = channel.unary_unary(
            "/handoff.demo.Echo/Say",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        i = 0
        while not stop.is_set():
            message = f"c{n}-{i}".encode()
            i += 1
            try:
                reply = say(encode(message), timeout=DEADLINE_S)
                ok = message in reply
                with lock:
                    if ok:
                        stats["ok"] += 1
                        stats["pids"].add(reply_pid(reply))
                    else:
                        stats["failed"] += 1
                        stats["errors"].append(f"wrong reply {reply!r}")
            except grpc.RpcError as error:
                with lock:
                    stats["failed"] += 1
                    stats["errors"].append(f"{error.code()}: {error.details()}")


workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
for worker in workers:
    worker.start()
print("started", flush=True)
sys.stdin.read()  # until the test closes our stdin
stop.set()
for worker in workers:
    worker.join()
stats["pids"] = sorted(stats["pids"])
print(json.dumps(stats), flush=True)
