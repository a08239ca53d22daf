"""REAPI's REST mapping through Google's discovery-based Python client, the
remotebuildexecution v2 document it ships, pointed at larder.

    python3 tests/http/discovery.py http://127.0.0.1:9092/
(needs: pip install google-api-python-client)
"""
import base64
import hashlib
import json
import os
import sys

import googleapiclient
from googleapiclient.discovery import build_from_document

root = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:9092/"
documents = os.path.join(os.path.dirname(googleapiclient.__file__), "discovery_cache", "documents")
with open(os.path.join(documents, "remotebuildexecution.v2.json")) as f:
    document = json.load(f)
document["rootUrl"] = root  # the document's default is Google's endpoint
rbe = build_from_document(document, developerKey="unused")

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
