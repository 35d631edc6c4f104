//! The cluster's VMs and hosts through the controller, so that a client
//! needs one address (the controller's) instead of every host's.
//!
//! `/v1/cluster/vms…` mirrors the agent's `/v1/vms…` (another prefix only
//! because both routers share one server on the controller's host):
//!
//! | method | path | the controller… |
//! |---|---|---|
//! | GET | `/v1/cluster/vms` | asks every joined host; answers the merged `[VmInfo]` (by name, then host), one `ferry-unreachable-host: NAME: WHY` header per host that did not answer |
//! | POST | `/v1/cluster/vms` | `PlaceVmRequest`: refuses a name taken on any host (409), creates on `host` or on the host with the most available memory that fits |
//! | GET, DELETE | `/v1/cluster/vms/{name}` | passes the request on to the VM's host |
//! | POST | `/v1/cluster/vms/{name}/{start,stop,pause,resume}` | passes it on |
//! | GET | `/v1/cluster/vms/{name}/console?lines=&follow=` | passes it on, the body streamed |
//! | GET | `/v1/cluster/hosts` | `[ClusterHost]`: the joined hosts, each with its live `HostInfo` or why it did not answer |
//! | GET | `/v1/cluster/hosts/{name}` | that host's `HostInfo` |
//!
//! A VM request is *passed on*, not re-implemented: the agent's status and
//! body come back unchanged (errors included), so a script sees the same
//! answers whether it talks to an agent or to the controller, and the agent
//! stays the one authority on its VMs. Only the controller's own failures
//! (unknown VM or host 404, taken name or no capacity 409, a host that does
//! not answer 502) are answered here, through `ControllerError`.
//!
//! The route table above is an allowlist on purpose. The agent's other VM
//! routes (`outgoing…`, `dirty-rate`) are steps of the controller's
//! migration saga; relaying them would let any client drive them with the
//! controller's host certificate (a confused deputy). For the same reason
//! the agent now sees the controller, not the user, as the caller of a
//! relayed request: the controller logs who asked.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ferry_api::client::{Relay, RelayResponse};
use ferry_api::{
    Client, ClientError, ClusterHost, HostInfo, PlaceVmRequest, VmInfo, VmState,
    UNREACHABLE_HOST_HEADER,
};
use ferry_pki::PeerIdentity;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::controller::{Controller, ControllerError};
use crate::routes::ApiError;
use crate::store::{HostRecord, StoreError};

/// How long one host gets to answer a question the controller asks every
/// host (list, locate, name check, facts): one hung host must not hold up
/// the answer about the others. Relayed requests have no such bound: a
/// stop waits for the guest, a followed console lasts as long as the VM.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body read (a VM spec is a few KiB), as on the agent.
const MAX_BODY_BYTES: usize = 1 << 20;

/// The base of the relayed VM routes; what follows it in a matched route is
/// the action passed on to the agent.
const VM_ROUTE: &str = "/v1/cluster/vms/{name}";

/// Creates run one at a time: the name check and the create on the chosen
/// host are not atomic, and two concurrent creates of one name must not
/// both pass the check. A process-wide lock (there is one controller per
/// ferryd); a create sent to an agent directly still bypasses it, and only
/// the agent's own per-host check catches that.
static CREATES: Mutex<()> = Mutex::const_new(());

type Result<T> = std::result::Result<T, ApiError>;

/// The routes of this module, merged into the controller's router.
pub(crate) fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route("/v1/cluster/vms", get(list).post(create))
        .route(VM_ROUTE, get(relay).delete(relay))
        .route("/v1/cluster/vms/{name}/start", post(relay))
        .route("/v1/cluster/vms/{name}/stop", post(relay))
        .route("/v1/cluster/vms/{name}/pause", post(relay))
        .route("/v1/cluster/vms/{name}/resume", post(relay))
        .route("/v1/cluster/vms/{name}/console", get(relay))
        .route("/v1/cluster/hosts", get(hosts))
        .route("/v1/cluster/hosts/{name}", get(host))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

async fn list(State(controller): State<Arc<Controller>>) -> Result<Response> {
    let records = controller.hosts().await?;
    let answers = ask_all(&controller, &records, |agent| async move {
        agent.list_vms().await
    })
    .await?;
    let mut vms: Vec<VmInfo> = Vec::new();
    let mut headers = HeaderMap::new();
    for (host, answer) in answers {
        match answer {
            Ok(listed) => vms.extend(listed),
            Err(error) => {
                let why = cause_chain(&error);
                tracing::warn!(%host, error = %why, "host left out of the VM list");
                if let Some(value) = header_value(&format!("{host}: {why}")) {
                    headers.append(UNREACHABLE_HOST_HEADER, value);
                }
            }
        }
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.host.cmp(&b.host)));
    Ok((headers, Json(vms)).into_response())
}

async fn create(
    State(controller): State<Arc<Controller>>,
    caller: Option<Extension<Arc<PeerIdentity>>>,
    body: std::result::Result<Json<PlaceVmRequest>, JsonRejection>,
) -> Result<Response> {
    let Json(request) = body.map_err(|rejection| ControllerError::InvalidRequest {
        reason: format!("invalid request body: {}", rejection.body_text()),
    })?;
    let mut request = request;
    let name = request.vm.spec.name.clone();
    let memory = request.vm.spec.memory_bytes;
    // A named host must be one that joined, whatever else holds.
    if let Some(host) = &request.host {
        controller.agent(host).await?;
    }
    // The agent has no list of the cluster's networks: give it the
    // definitions of those the NICs name (an unknown one is refused here).
    request.vm.networks = crate::networks::resolve(&controller, &request.vm.spec).await?;
    let _one_at_a_time = CREATES.lock().await;
    let records = controller.hosts().await?;
    let answers = ask_all(&controller, &records, |agent| async move {
        Ok((agent.list_vms().await?, agent.host().await?))
    })
    .await?;
    // A taken name is the more useful answer, so it goes first; a host
    // that did not answer might hold the name, so it refuses the create
    // too (names are unique across the cluster, not per host).
    if let Some((host, _)) = answers
        .iter()
        .find(|(_, answer)| matches!(answer, Ok((vms, _)) if vms.iter().any(|vm| vm.name == name)))
    {
        return Err(ControllerError::VmNameTaken {
            name,
            host: host.clone(),
        }
        .into());
    }
    let mut candidates = Vec::with_capacity(answers.len());
    let mut unfit = Vec::new();
    for (host, answer) in answers {
        let (vms, info) = answer?;
        // MACs are unique across the cluster: two guests with one MAC on a
        // shared segment would steal each other's frames.
        crate::networks::check_macs_unique(&request.vm.spec, vms.iter())?;
        match crate::networks::host_provides(&info, &request.vm.networks) {
            Ok(()) => candidates.push((host, info.memory_available_bytes)),
            Err(why) => unfit.push(format!("{host} {why}")),
        }
    }
    let target = match request.host.clone() {
        // The named host's agent judges whether the VM fits it, as when
        // the VM is created there directly; the networks are judged here.
        Some(host) => {
            if let Some(why) = unfit
                .iter()
                .find(|why| why.starts_with(&format!("{host} ")))
            {
                return Err(ControllerError::InvalidRequest {
                    reason: format!("host {why}"),
                }
                .into());
            }
            host
        }
        None => place(&candidates, memory)
            .ok_or_else(|| {
                if candidates.is_empty() && !unfit.is_empty() {
                    ControllerError::InvalidRequest {
                        reason: format!("no host provides the VM's networks: {}", unfit.join("; ")),
                    }
                } else {
                    ControllerError::NoCapacity {
                        memory_mib: memory.div_ceil(1 << 20),
                    }
                }
            })?
            .to_string(),
    };
    let agent = controller.agent(&target).await?;
    let body = serde_json::to_vec(&request.vm).expect("a VM request read from JSON writes back");
    let response = agent
        .relay_vm(Relay {
            method: Method::POST,
            vm: None,
            action: None,
            query: None,
            content_type: Some("application/json"),
            body,
        })
        .await
        .map_err(|source| ControllerError::Unreachable {
            name: target.clone(),
            source,
        })?;
    tracing::info!(vm = %name, host = %target, caller = %caller_name(&caller), status = %response.status(), "VM create passed on");
    Ok(pass_back(response))
}

/// Every per-VM route: find the VM's host, pass the request on unchanged.
#[allow(clippy::too_many_arguments)] // one per part of the request relayed
async fn relay(
    State(controller): State<Arc<Controller>>,
    caller: Option<Extension<Arc<PeerIdentity>>>,
    matched: MatchedPath,
    Path(name): Path<String>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let action = action_of(matched.as_str());
    let (host, agent) = locate(&controller, &name).await?;
    if method != Method::GET {
        tracing::info!(vm = %name, %host, action = action.unwrap_or(""), %method, caller = %caller_name(&caller), "VM request passed on");
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    let response = agent
        .relay_vm(Relay {
            method,
            vm: Some(&name),
            action,
            query: query.as_deref(),
            content_type,
            body: body.to_vec(),
        })
        .await
        .map_err(|source| ControllerError::Unreachable { name: host, source })?;
    Ok(pass_back(response))
}

async fn hosts(State(controller): State<Arc<Controller>>) -> Result<Json<Vec<ClusterHost>>> {
    let records = controller.hosts().await?;
    let answers = ask_all(
        &controller,
        &records,
        |agent| async move { agent.host().await },
    )
    .await?;
    let hosts = records
        .into_iter()
        .zip(answers)
        .map(|(record, (_, answer))| {
            let (info, error) = match answer {
                Ok(info) => (Some(info), None),
                Err(error) => (None, Some(cause_chain(&error))),
            };
            ClusterHost {
                name: record.name,
                url: record.url,
                joined_at: record.joined_at,
                last_seen: record.last_seen,
                facts: record.facts,
                info,
                error,
            }
        })
        .collect();
    Ok(Json(hosts))
}

async fn host(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<Json<HostInfo>> {
    let agent = controller.agent(&name).await?;
    match tokio::time::timeout(ASK_TIMEOUT, agent.host()).await {
        Ok(Ok(info)) => Ok(Json(info)),
        Ok(Err(source)) => Err(ControllerError::Unreachable { name, source }.into()),
        Err(_) => Err(ControllerError::NoAnswer {
            name,
            after: ASK_TIMEOUT,
        }
        .into()),
    }
}

/// Asks every host in `hosts` the same question at once and answers in
/// their order. Each host gets `ASK_TIMEOUT`; a host that errs or is late
/// has an `Unreachable` or `NoAnswer` answer, not a failed whole.
pub(crate) async fn ask_all<T, F, Fut>(
    controller: &Controller,
    hosts: &[HostRecord],
    ask: F,
) -> std::result::Result<Vec<(String, std::result::Result<T, ControllerError>)>, ControllerError>
where
    T: Send + 'static,
    F: Fn(Client) -> Fut,
    Fut: Future<Output = std::result::Result<T, ClientError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for (index, host) in hosts.iter().enumerate() {
        let question = ask(controller.agent(&host.name).await?);
        let name = host.name.clone();
        tasks.spawn(async move {
            let answer = match tokio::time::timeout(ASK_TIMEOUT, question).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(source)) => Err(ControllerError::Unreachable { name, source }),
                Err(_) => Err(ControllerError::NoAnswer {
                    name,
                    after: ASK_TIMEOUT,
                }),
            };
            (index, answer)
        });
    }
    let mut answers: Vec<Option<std::result::Result<T, ControllerError>>> =
        hosts.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, answer) = joined.expect("a question to a host does not panic");
        answers[index] = Some(answer);
    }
    Ok(hosts
        .iter()
        .zip(answers)
        .map(|(host, answer)| {
            (
                host.name.clone(),
                answer.expect("every spawned question was joined"),
            )
        })
        .collect())
}

/// The host of VM `name`, asking every host (the agents, not the store,
/// know what runs: G3), and a client for it.
pub(crate) async fn locate(
    controller: &Controller,
    name: &str,
) -> std::result::Result<(String, Client), ControllerError> {
    let records = controller.hosts().await?;
    let answers = ask_all(controller, &records, |agent| {
        let name = name.to_string();
        async move {
            match agent.get_vm(&name).await {
                Ok(info) => Ok(Some(info.state)),
                Err(error) if error.is_not_found() => Ok(None),
                Err(error) => Err(error),
            }
        }
    })
    .await?;
    let mut found = Vec::new();
    let mut unreachable = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(Some(state)) => found.push((host, state)),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%host, error = %ferry_api::error_chain(&error), "host unreachable while locating a VM");
                unreachable.push(format!("{host}: {}", cause_chain(&error)));
            }
        }
    }
    if found.is_empty() {
        return Err(if unreachable.is_empty() {
            ControllerError::VmNotFound {
                name: name.to_string(),
            }
        } else {
            ControllerError::VmNotFoundSomeUnreachable {
                name: name.to_string(),
                unreachable: unreachable.join("; "),
            }
        });
    }
    let recorded = if found.len() > 1 {
        match controller.store.get_vm(name).await {
            Ok(record) => Some(record.host),
            Err(StoreError::NotFound { .. }) => None,
            Err(error) => {
                tracing::warn!(vm = %name, error = %ferry_api::error_chain(&error), "cannot read the VM's recorded owner");
                None
            }
        }
    } else {
        None
    };
    let owner = choose_owner(recorded.as_deref(), &found).to_string();
    let agent = controller.agent(&owner).await?;
    Ok((owner, agent))
}

/// The host a request for a VM goes to when `found` (not empty) lists
/// every host that has it. More than one has it during a migration: the
/// destination defines the VM before the commit. The store's owner is the
/// truth then (the commit point writes it before the destination runs the
/// guest); without a record, the host where the guest runs, else the first.
fn choose_owner<'a>(recorded: Option<&str>, found: &'a [(String, VmState)]) -> &'a str {
    found
        .iter()
        .find(|(host, _)| Some(host.as_str()) == recorded)
        .or_else(|| found.iter().find(|(_, state)| *state == VmState::Running))
        .unwrap_or(&found[0])
        .0
        .as_str()
}

/// The host with the most available memory that fits `memory` bytes; on a
/// tie the first (hosts come in name order).
fn place(free: &[(String, u64)], memory: u64) -> Option<&str> {
    let mut best: Option<&(String, u64)> = None;
    for candidate in free.iter().filter(|(_, available)| *available >= memory) {
        if best.is_none_or(|(_, most)| candidate.1 > *most) {
            best = Some(candidate);
        }
    }
    best.map(|(host, _)| host.as_str())
}

/// The action of a relayed route (`start`, `console`…), `None` for the VM
/// itself: the route table is the allowlist, so the matched route says
/// what to pass on.
fn action_of(matched: &str) -> Option<&str> {
    matched
        .strip_prefix(VM_ROUTE)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|action| !action.is_empty())
}

/// The agent's answer as the controller's: status, content type and the
/// body, streamed as it arrives (a followed console never ends while the
/// VM runs). If the agent goes away mid-body, the stream errs and the
/// client's connection is cut, as it would be talking to the agent.
fn pass_back(response: RelayResponse) -> Response {
    let mut answer = Response::builder().status(response.status());
    if let Some(content_type) = response.headers().get(header::CONTENT_TYPE) {
        answer = answer.header(header::CONTENT_TYPE, content_type.clone());
    }
    answer
        .body(Body::from_stream(response.bytes_stream()))
        .expect("a status and a header copied from a valid response are valid")
}

/// What to tell about a host that did not answer: for an unreachable host
/// the client error's chain (it names the URL), else the whole error.
pub(crate) fn cause_chain(error: &ControllerError) -> String {
    match error {
        ControllerError::Unreachable { source, .. } => ferry_api::error_chain(source),
        other => ferry_api::error_chain(other),
    }
}

/// `text` as a header value: anything but printable ASCII (an error
/// message may quote a non-ASCII name) becomes `?`.
fn header_value(text: &str) -> Option<HeaderValue> {
    let printable: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    HeaderValue::from_str(&printable).ok()
}

fn caller_name(caller: &Option<Extension<Arc<PeerIdentity>>>) -> String {
    caller
        .as_ref()
        .map(|Extension(identity)| identity.name.clone())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(h, m)| (h.to_string(), *m)).collect()
    }

    #[test]
    fn placement_picks_the_most_available_memory_that_fits() {
        let free = hosts(&[("host1", 2 << 30), ("host2", 6 << 30), ("host3", 4 << 30)]);
        assert_eq!(place(&free, 1 << 30), Some("host2"));
    }

    #[test]
    fn placement_skips_hosts_too_small_and_refuses_when_none_fits() {
        let free = hosts(&[("host1", 512 << 20), ("host2", 1 << 30)]);
        assert_eq!(place(&free, 1 << 30), Some("host2"));
        assert_eq!(place(&free, 2 << 30), None);
    }

    #[test]
    fn placement_breaks_ties_by_host_order() {
        let free = hosts(&[("host1", 4 << 30), ("host2", 4 << 30)]);
        assert_eq!(place(&free, 1 << 30), Some("host1"));
    }

    #[test]
    fn a_vm_on_two_hosts_goes_to_its_recorded_owner() {
        let found = vec![
            ("host1".to_string(), VmState::Running),
            ("host2".to_string(), VmState::Paused),
        ];
        assert_eq!(choose_owner(Some("host2"), &found), "host2");
        assert_eq!(choose_owner(None, &found), "host1");
        assert_eq!(choose_owner(Some("host9"), &found), "host1");
    }

    #[test]
    fn actions_come_from_the_matched_route() {
        assert_eq!(action_of("/v1/cluster/vms/{name}"), None);
        assert_eq!(action_of("/v1/cluster/vms/{name}/console"), Some("console"));
    }

    #[test]
    fn header_values_are_printable_ascii() {
        let value = header_value("host2: no VM “é”\nhere").unwrap();
        assert_eq!(value.to_str().unwrap(), "host2: no VM ????here");
    }
}
