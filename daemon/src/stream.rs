//! One stream an agent opened: its first frame says what it is, and the stream goes to
//! the handler for that: a task ([`crate::task`]), a link probe ([`crate::probe`]), a
//! certificate renewal ([`crate::enroll`]) or the agent's fleet stream
//! ([`crate::fleet::stream`]).

use crate::probe::ProbeGate;
use crate::state::Shared;
use crate::task;
use std::time::Duration;
use updraft_proto::{ErrorCode, FrameKind, STOP_INPUT};
use updraft_shared::tls::AuthenticatedPeer;
use updraft_shared::wire::FrameReader;

/// How long a new stream may take to deliver its request header. A peer that opens
/// streams and sends nothing must not pin handlers forever.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the first frame of a stream `peer` opened (within [`HEADER_TIMEOUT`]) and
/// serves the stream by it.
pub(crate) async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: &AuthenticatedPeer,
    conn_id: usize,
    shared: &Shared,
    probes: &ProbeGate,
) {
    let agent = peer.agent_id();
    let mut reader = FrameReader::new(recv);
    match tokio::time::timeout(HEADER_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) => match frame.kind {
            FrameKind::Probe => {
                let draining = shared.is_draining();
                Box::pin(crate::probe::serve(
                    send, reader, &frame, probes, draining, agent,
                ))
                .await;
            }
            FrameKind::CertRequest => {
                let enroller = shared.enroller();
                Box::pin(crate::enroll::serve_renewal(
                    send, reader, &frame, peer, &enroller, shared,
                ))
                .await;
            }
            FrameKind::AgentReport => {
                let catalog = shared.catalog();
                let on = crate::fleet::stream::On {
                    conn_id,
                    fleet: &shared.fleet,
                    catalog: &catalog,
                    draining: shared.draining.clone(),
                };
                Box::pin(crate::fleet::stream::serve(send, reader, frame, peer, on)).await;
            }
            _ => task::serve(send, reader, &frame, peer, shared).await,
        },
        Ok(Ok(None)) => {}
        Ok(Err(e)) => task::refuse_header(send, reader, agent, e).await,
        Err(_) => {
            let (mut recv, _) = reader.into_parts();
            let _ = recv.stop(STOP_INPUT.into());
            task::reject(
                &mut send,
                ErrorCode::BadRequest,
                format!("no request header within {HEADER_TIMEOUT:?}"),
            )
            .await;
        }
    }
}
