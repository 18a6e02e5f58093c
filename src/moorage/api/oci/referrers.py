"""`GET /v2/<name>/referrers/<digest>`: manifests whose subject is that digest."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.oci.common import repository_name
from moorage.auth.access import PULL
from moorage.digests import parse_digest
from moorage.services import Services
from moorage.storage.manifests import OCI_INDEX


def routes(services: Services) -> list[Route]:
    registry = services.registry
    guard = services.guard

    async def referrers(request: Request) -> Response:
        name = repository_name(request)
        digest = request.path_params["digest"]
        parse_digest(digest)
        artifact_type = request.query_params.get("artifactType") or None
        access = await guard.authorize(request, name, [PULL])
        found = (
            await registry.referrers(name, digest, artifact_type)
            if access.visible
            else []
        )
        descriptors = []
        for record in found:
            descriptor: dict[str, object] = {
                "mediaType": record.media_type,
                "digest": record.digest,
                "size": record.size,
            }
            if record.artifact_type:
                descriptor["artifactType"] = record.artifact_type
            if record.annotations_json:
                descriptor["annotations"] = json.loads(record.annotations_json)
            descriptors.append(descriptor)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        return Response(
            json.dumps(index, separators=(",", ":")),
            headers=headers,
            media_type=OCI_INDEX,
        )

    return [Route("/v2/{name:path}/referrers/{digest}", referrers, methods=["GET"])]
