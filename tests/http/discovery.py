"""REAPI's REST mapping through Google's discovery-based Python client, the
remotebuildexecution v2 document it ships, pointed at larder; then
ByteStream over HTTP through the v1 document's `media` resource (simple,
multipart and resumable uploads, whole and chunked downloads).

    python3 tests/http/discovery.py http://127.0.0.1:9092/
(needs: pip install google-api-python-client)
"""
import base64
import hashlib
import io
import json
import os
import sys
import uuid

import googleapiclient
from googleapiclient.discovery import build_from_document
from googleapiclient.http import MediaIoBaseDownload, MediaIoBaseUpload

root = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:9092/"
documents = os.path.join(os.path.dirname(googleapiclient.__file__), "discovery_cache", "documents")


def client(version):
    with open(os.path.join(documents, f"remotebuildexecution.{version}.json")) as f:
        document = json.load(f)
    document["rootUrl"] = root  # the document's default is Google's endpoint
    return build_from_document(document, developerKey="unused")


rbe = client("v2")

data = b"hello from the discovery client"
digest = {"hash": hashlib.sha256(data).hexdigest(), "sizeBytes": str(len(data))}
caps = rbe.v2().getCapabilities(instanceName="main").execute()
print("digest functions:", caps["cacheCapabilities"]["digestFunctions"])
rbe.blobs().batchUpdate(
    instanceName="main",
    body={"requests": [{"digest": digest, "data": base64.b64encode(data).decode()}]},
).execute()
missing = rbe.blobs().findMissing(instanceName="main", body={"blobDigests": [digest]}).execute()
assert missing.get("missingBlobDigests", []) == [], missing
read = rbe.blobs().batchRead(instanceName="main", body={"digests": [digest]}).execute()
assert base64.b64decode(read["responses"][0]["data"]) == data, read
action = {"hash": hashlib.sha256(b"an action").hexdigest(), "sizeBytes": "9"}
rbe.actionResults().update(
    instanceName="main", hash=action["hash"], sizeBytes=action["sizeBytes"],
    body={"outputFiles": [{"path": "out.txt", "digest": digest}], "exitCode": 0},
).execute()
result = rbe.actionResults().get(
    instanceName="main", hash=action["hash"], sizeBytes=action["sizeBytes"], inlineOutputFiles="out.txt"
).execute()
assert base64.b64decode(result["outputFiles"][0]["contents"]) == data, result
# The empty blob is an empty Directory: a tree of one.
empty = hashlib.sha256(b"").hexdigest()
tree = rbe.blobs().getTree(instanceName="main", hash=empty, sizeBytes="0", pageSize=10).execute()
assert tree["directories"] == [{}], tree
print("discovery client: capabilities, batchUpdate, findMissing, batchRead, getTree, actionResults: OK")

# ByteStream over HTTP: the v1 document's media resource.
media = client("v1").media()


def upload_name(blob, instance="main"):
    return f"{instance}/uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(blob).hexdigest()}/{len(blob)}"


def download(blob, instance="main", chunksize=1 << 20):
    name = f"{instance}/blobs/{hashlib.sha256(blob).hexdigest()}/{len(blob)}"
    out = io.BytesIO()
    downloader = MediaIoBaseDownload(out, media.download_media(resourceName=name), chunksize=chunksize)
    done = False
    while not done:
        _, done = downloader.next_chunk()
    return out.getvalue()


# A payload ending in CR: the multipart body ends "\r\n--B--" with bare LF ends.
blob = os.urandom(3 * 1024 * 1024 + 5) + b"\r"
for how in ["simple", "multipart", "resumable"]:
    payload = blob + how.encode()
    name = upload_name(payload)
    chunksize = 1024 * 1024 + 7
    body = MediaIoBaseUpload(io.BytesIO(payload), mimetype="application/octet-stream",
                             chunksize=chunksize, resumable=how == "resumable")
    # A request body makes the client send multipart; a resumable media body a session.
    request = media.upload(resourceName=name, media_body=body,
                           body={"resourceName": name} if how == "multipart" else None)
    if how == "resumable":
        reply, chunks = None, 0
        while reply is None:
            _, reply = request.next_chunk()
            chunks += 1
        assert chunks == -(-len(payload) // chunksize), chunks
    else:
        reply = request.execute()
    assert reply == {"resourceName": name}, reply
    assert download(payload) == payload, how
    assert download(payload, chunksize=65536 + 3) == payload, how
assert download(b"", instance="team/a") == b""
print("discovery client: media upload (simple, multipart, resumable), download (whole, chunked, empty): OK")
