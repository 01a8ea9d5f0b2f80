//! One agent's fleet stream: reads its reports into the registry and answers the first
//! with the daemon's catalog and clock, and passes on the policies pushed to it.

use std::time::SystemTime;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use updraft_proto::fleet::{AgentReport, FleetNotice, MAX_CATALOG_NAMES};
use updraft_proto::{Frame, STOP_INPUT};
use updraft_shared::tls::AuthenticatedPeer;
use updraft_shared::wire::{write_frame, FrameReader};

use super::Registry;
use updraft_shared::catalog::Catalog;

/// What a fleet stream works against.
pub(crate) struct On<'a> {
    /// The connection's stable id.
    pub(crate) conn_id: usize,
    /// The registry.
    pub(crate) fleet: &'a Registry,
    /// The catalog the hello names.
    pub(crate) catalog: &'a Catalog,
    /// Flips when the drain starts.
    pub(crate) draining: tokio::sync::watch::Receiver<bool>,
}

/// Notices waiting to be written to one agent; one past these waits for the agent's
/// next report.
const NOTICE_QUEUE: usize = 4;

/// Serves the fleet stream whose first frame, `first`, is the agent's first report,
/// until the agent ends it, the connection closes or the daemon starts draining.
pub(crate) async fn serve(
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    first: Frame,
    peer: &AuthenticatedPeer,
    on: On<'_>,
) {
    let agent = peer.agent_id();
    let On {
        conn_id,
        fleet,
        catalog,
        mut draining,
    } = on;
    let mut frame = first;
    let mut greeted = false;
    let (tx, mut notices) = mpsc::channel(NOTICE_QUEUE);
    loop {
        let report = match AgentReport::from_frame(&frame)
            .map_err(|e| e.to_string())
            .and_then(|r| r.validate().map(|()| r).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                warn!(agent, error = %e, "peer misbehaved: bad agent report; fleet stream closed");
                let (mut recv, _) = reader.into_parts();
                let _ = recv.stop(STOP_INPUT.into());
                let _ = send.reset(0u32.into());
                return;
            }
        };
        fleet.reported(agent, conn_id, report, &tx);
        if !greeted {
            greeted = true;
            if write_frame(&mut send, &hello(catalog).to_frame())
                .await
                .is_err()
            {
                return;
            }
        }
        // A drain waits for the streams in flight; this one would last as long as the
        // connection, so it ends when the drain starts.
        let next = loop {
            tokio::select! {
                next = reader.next() => break next,
                Some(n) = notices.recv() => {
                    if write_frame(&mut send, &n.to_frame()).await.is_err() {
                        return;
                    }
                }
                () = async { let _ = draining.wait_for(|d| *d).await; } => {
                    let _ = send.finish();
                    return;
                }
            }
        };
        frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                debug!(agent, error = %e, "fleet stream ended");
                return;
            }
        };
    }
}

/// The answer to an agent's first report: the catalog it may offload to, and the time.
fn hello(catalog: &Catalog) -> FleetNotice {
    FleetNotice::Hello {
        tasks: catalog
            .names()
            .take(MAX_CATALOG_NAMES)
            .map(str::to_string)
            .collect(),
        time_unix_ms: super::unix_ms(SystemTime::now()),
    }
}
