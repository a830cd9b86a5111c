"""Owner-only mode: a model is visible only to the tokens that registered it.

Every authenticated RegisterModel records its token's name as an owner (registry claim files),
whether or not the mode is on, so it can be switched on later. With the mode on:

- Get/Delete/ComputeKernel/Predict/Evaluate of a model the caller does not own answer NOT_FOUND
  with the same detail as an unknown id, so ids of other tokens' models cannot be probed.
- ListModels lists only the caller's models.
- Ids are content hashes, so a second token registering identical content gets the same id and
  becomes a co-owner. DeleteModel by one co-owner removes only its claim; the model goes when its
  last owner deletes it.
- Models without owners (registered while authentication was off) stay visible to everyone.
- Tokens with role admin see and delete every model.

Datasets are not owner-scoped: their ids are content hashes, usable only by whoever knows them.
"""

from __future__ import annotations

import asyncio

from ntk_client._proto.ntk.v1 import model_pb2

from ntk_server.auth import Principal, Role
from ntk_server.errors import NotFound
from ntk_server.registry import Registry


class Ownership:
    def __init__(self, registry: Registry):
        self.registry = registry

    async def _owners(self, model_id: str) -> frozenset[str]:
        try:
            return await asyncio.to_thread(self.registry.model_owners, model_id)
        except NotFound:
            return frozenset()  # a malformed id: the servicer answers it as for any caller

    @staticmethod
    def visible(principal: Principal, owners: frozenset[str]) -> bool:
        return principal.role >= Role.ADMIN or not owners or principal.name in owners

    async def check(self, principal: Principal, model_id: str) -> None:
        """NOT_FOUND, worded as for an unknown id, unless the caller may see the model."""
        if not self.visible(principal, await self._owners(model_id)):
            # Same text as Registry.get_model's, so a foreign model looks like a missing one.
            raise NotFound(f"no model with id {model_id!r}", field="model_id", value=model_id)

    async def filter(
        self, principal: Principal, response: model_pb2.ListModelsResponse
    ) -> model_pb2.ListModelsResponse:
        """Drop the models the caller may not see from a ListModels answer."""
        if principal.role >= Role.ADMIN:
            return response
        keep = [m for m in response.models if self.visible(principal, await self._owners(m.id))]
        if len(keep) == len(response.models):
            return response
        return model_pb2.ListModelsResponse(models=keep)

    async def release(self, principal: Principal, model_id: str) -> bool:
        """For DeleteModel: drop the caller's claim; True when co-owners keep the model alive.

        False means the caller may delete the model itself (it is the last owner, an admin, or
        the model is unowned).
        """
        if principal.role >= Role.ADMIN:
            return False
        owners = await self._owners(model_id)
        if principal.name not in owners or owners == {principal.name}:
            return False
        left = await asyncio.to_thread(self.registry.release_model, model_id, principal.name)
        return bool(left)
