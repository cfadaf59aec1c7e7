//! Interop with a real end-to-end encryption client library: matrix-nio with libolm
//! (installed by `.ci/install-deps`) runs two users and a second device against the
//! real server; see `interop/e2ee_nio.py` for the scenario (and `federation.rs` for the
//! same across two servers).

mod common;

use common::{OPEN, TestServer};

#[tokio::test]
async fn matrix_nio_clients_exchange_encrypted_messages_and_forward_keys() {
    let s = TestServer::start(OPEN).await;
    common::run_nio_scenario(std::slice::from_ref(&s.base)).await;
}
