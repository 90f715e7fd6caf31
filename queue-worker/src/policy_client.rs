//! A general (reqwest) client whose DNS resolver applies an [`EgressPolicy`]: callbacks, and
//! direct-mode functions whose body is streamed from the blob store. A leaf on
//! `queue_core::egress`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use queue_core::egress::{EgressPolicy, Refusal};

/// The general client's resolver for callbacks: it resolves the name and refuses it if the
/// callback policy refuses any of its addresses, so the connection goes only to addresses that
/// were checked. (Address literals skip resolvers; [`EgressPolicy::check_url`] checks those.)
#[derive(Debug)]
struct PolicyResolver {
    policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            for addr in &addrs {
                policy.check_resolved(host, addr.ip())?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// The refusal behind a general-client error, if the resolver refused the destination.
pub(crate) fn refusal_of(error: &reqwest::Error) -> Option<Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return Some(*refusal);
        }
        source = e.source();
    }
    None
}

/// A general client whose resolver applies `policy` (callbacks; direct-mode functions whose
/// body is streamed from the blob store).
pub(crate) fn policy_client(
    policy: Arc<EgressPolicy>,
    user_agent: &str,
) -> Result<reqwest::Client, reqwest::Error> {
    // As in `invoke::http_client`: one rustls provider for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(user_agent)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(PolicyResolver { policy }))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
}
