//! `EntityService.ForgetEntity` and `UnblockEntity`: the right to erasure
//! at the façade (access, audit, routing to the entity's holder); what a
//! forget does is [`crate::erase`].

use super::entity::resolve;
use super::forward::{self, on_holder};
use super::{Timer, guard};
use crate::access::Action;
use crate::app::Fabric;
use crate::erase::{self, Erased};
use crate::event::{EntityKey, EraseAction};
use crate::proto::{
    ForgetEntityRequest, ForgetEntityResponse, UnblockEntityRequest, UnblockEntityResponse,
};
use tonic::{Request, Response, Status};

/// The longest `reason` kept in an audit line.
const MAX_REASON: usize = 256;

/// Checks a call's permission (`forget:TYPE`) and arguments; returns who
/// it is from and the entity it names.
fn admit<M>(
    fabric: &Fabric,
    request: &Request<M>,
    method: &'static str,
    (ty, id, reason): (&str, &str, &str),
) -> Result<(String, EntityKey), Status> {
    let who = fabric.allow_named(request, method, Action::Forget { ty })?;
    if reason.len() > MAX_REASON {
        return Err(Status::invalid_argument(format!(
            "reason has {} bytes; at most {MAX_REASON}",
            reason.len()
        )));
    }
    let (key, _) = resolve(fabric, ty, id, "")?;
    Ok((who, key))
}

pub(super) async fn forget(
    fabric: &Fabric,
    peers: &forward::Peers,
    request: Request<ForgetEntityRequest>,
) -> Result<Response<ForgetEntityResponse>, Status> {
    const METHOD: &str = "ForgetEntity";
    let _t = Timer::start(fabric, METHOD);
    let r = request.get_ref();
    let (who, key) = admit(fabric, &request, METHOD, (&r.r#type, &r.id, &r.reason))?;
    let action = EraseAction::Forget {
        block: !r.allow_rebuild,
    };
    let out = on_holder(
        fabric,
        peers,
        &request,
        &key,
        || async {
            let e = erase::erase(fabric, &key, action, forward::deadline(&request)).await?;
            Ok(response(&e))
        },
        |c, ask| async move {
            peers
                .entity_client(c)
                .forget_entity(ask)
                .await
                .map(Response::into_inner)
        },
    )
    .await?;
    tracing::info!(
        target: "fabric::audit",
        principal = who,
        method = METHOD,
        peer = %crate::access::Peer::of(&request),
        entity = %key,
        allow_rebuild = r.allow_rebuild,
        reason = %guard::shown(&r.reason),
        was_held = out.was_held,
        key_deleted = out.key_deleted,
        partition = out.partition,
        offset = out.offset,
        "entity forgotten"
    );
    Ok(Response::new(out))
}

pub(super) async fn unblock(
    fabric: &Fabric,
    peers: &forward::Peers,
    request: Request<UnblockEntityRequest>,
) -> Result<Response<UnblockEntityResponse>, Status> {
    const METHOD: &str = "UnblockEntity";
    let _t = Timer::start(fabric, METHOD);
    let r = request.get_ref();
    let (who, key) = admit(fabric, &request, METHOD, (&r.r#type, &r.id, &r.reason))?;
    let out = on_holder(
        fabric,
        peers,
        &request,
        &key,
        || async {
            let e = erase::erase(
                fabric,
                &key,
                EraseAction::Unblock,
                forward::deadline(&request),
            )
            .await?;
            Ok(UnblockEntityResponse {
                was_blocked: e.done.was_blocked,
            })
        },
        |c, ask| async move {
            peers
                .entity_client(c)
                .unblock_entity(ask)
                .await
                .map(Response::into_inner)
        },
    )
    .await?;
    tracing::info!(
        target: "fabric::audit",
        principal = who,
        method = METHOD,
        peer = %crate::access::Peer::of(&request),
        entity = %key,
        reason = %guard::shown(&r.reason),
        was_blocked = out.was_blocked,
        "entity unblocked"
    );
    Ok(Response::new(out))
}

fn response(e: &Erased) -> ForgetEntityResponse {
    ForgetEntityResponse {
        was_held: e.done.was_held,
        blocked: e.done.blocked,
        partition: e.partition,
        offset: e.offset,
        snapshot_written: e.snapshot_written,
        key_deleted: e.done.key_deleted,
    }
}
