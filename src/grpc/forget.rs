//! `EntityService.ForgetEntity` and `UnblockEntity`: the right to erasure
//! at the façade (access, audit, routing to the entity's holder); what a
//! forget does is [`crate::erase`].

use super::entity::{resolve, serving};
use super::forward::{self, Route};
use super::{Timer, guard};
use crate::access::Action;
use crate::app::Fabric;
use crate::erase::{self, Erased};
use crate::event::{EntityKey, EraseAction};
use crate::proto::entity_service_client::EntityServiceClient;
use crate::proto::{
    ForgetEntityRequest, ForgetEntityResponse, UnblockEntityRequest, UnblockEntityResponse,
};
use std::future::Future;
use std::time::Instant;
use tonic::transport::Channel;
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
        |mut c, ask| async move { c.forget_entity(ask).await.map(Response::into_inner) },
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
        |mut c, ask| async move { c.unblock_entity(ask).await.map(Response::into_inner) },
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

/// Runs `local` where `key`'s partition is served: here, or (Kafka, several
/// processes) on its holder through `remote`, waiting while it moves, as
/// reads do (see [`forward`]).
async fn on_holder<M, R, L, LF, F, FF>(
    fabric: &Fabric,
    peers: &forward::Peers,
    request: &Request<M>,
    key: &EntityKey,
    local: L,
    remote: F,
) -> Result<R, Status>
where
    M: Clone,
    L: Fn() -> LF,
    LF: Future<Output = Result<R, Status>>,
    F: Fn(EntityServiceClient<Channel>, Request<M>) -> FF,
    FF: Future<Output = Result<R, Status>>,
{
    let auth = forward::credentials(request);
    let until: Option<Instant> = forward::deadline(request);
    let hop = forward::forwarded(request);
    let p = key.partition(fabric.bus.partitions());
    loop {
        let refused = match forward::route(fabric, p) {
            Route::Local => return local().await,
            Route::Remote(addr) if !hop => {
                let c = peers.client(&addr)?;
                let ask = forward::outgoing(request.get_ref().clone(), until, &auth);
                match remote(c, ask).await {
                    Ok(out) => return Ok(out),
                    // An erasure applied twice comes to the same: retried.
                    Err(s) if super::entity::retryable(&s) => s,
                    Err(s) => return Err(s),
                }
            }
            Route::Remote(_) | Route::Moving => match serving(fabric, key) {
                Ok(()) => continue,
                Err(s) => s,
            },
        };
        if !forward::pause(until).await {
            return Err(refused);
        }
    }
}
