//! The whole pipeline for fault scenarios: an order database with the
//! outbox, relays and a dispatch consumer as child processes (so they can
//! be SIGKILLed), the dispatch database, and an audit queue bound to the
//! dispatch exchange that records what the broker routed, in order. On the
//! shared servers, or on the HA cluster ([`Pipeline::start_on`]).

use std::net::TcpListener;
use std::process::Child;
use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::books::{Books, Expected, settle_and_check, start_load};
use crate::broker::connect_to;
use crate::dispatch::{spawn_dispatch_process, test_settings, topology, wait_for_consumers_on};
use crate::relay::spawn_relay_process;
use crate::{Servers, TestDb, unique_name};

/// Relay settings for the scenarios: a short lease, so rows leased by a
/// killed relay come back quickly, and few attempts for unroutable rows.
pub const RELAY_ENV: &[(&str, &str)] = &[
    ("OUTBOX_LEASE_MS", "2000"),
    ("OUTBOX_MAX_ATTEMPTS", "3"),
    ("OUTBOX_RETRY_BASE_MS", "50"),
    ("OUTBOX_RETRY_MAX_MS", "400"),
    ("RUST_LOG", "error"),
];

pub struct Pipeline {
    pub servers: Servers,
    /// The order service's database: `orders` and the outbox.
    pub app: TestDb,
    pub dispatch_db: TestDb,
    pub dispatch: ::dispatch::Settings,
    pub names: outbox_consumer::Topology,
    /// Bound to the dispatch exchange: every routed copy, in broker order.
    pub audit_queue: String,
    pub relays: Vec<Child>,
    pub consumer: Child,
    /// The consumer's HTTP API (`/readyz`).
    pub consumer_http: String,
    relay_env: Vec<(String, String)>,
    consumer_env: Vec<(String, String)>,
}

impl Pipeline {
    /// Starts `relays` relays (with [`RELAY_ENV`] and `relay_env` on top)
    /// and one consumer (`consumer_env` on top of the test settings).
    pub async fn start(
        relays: usize,
        relay_env: &[(&str, &str)],
        consumer_env: &[(&str, &str)],
    ) -> Pipeline {
        Pipeline::start_on(&Servers::shared(), relays, relay_env, consumer_env).await
    }

    /// [`Pipeline::start`] with both databases, the relays and the
    /// consumer on `servers`.
    pub async fn start_on(
        servers: &Servers,
        relays: usize,
        relay_env: &[(&str, &str)],
        consumer_env: &[(&str, &str)],
    ) -> Pipeline {
        let app = TestDb::empty_on(&servers.admin_url).await;
        let target = outbox_service::db::parse_url(&app.url, None).expect("app url");
        orders::migrate(&target).await.expect("migrate orders");
        let dispatch_db = TestDb::empty_on(&servers.admin_url).await;
        let mut dispatch = test_settings(&dispatch_db);
        dispatch.amqp_url = Some(servers.amqp_url.clone());
        if servers.quorum_queues {
            dispatch.queue_type = Some("quorum".into());
        }
        let names = topology(&dispatch);
        let owned = |env: &[(&str, &str)]| -> Vec<(String, String)> {
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut relay_env_all = owned(RELAY_ENV);
        relay_env_all.push(("OUTBOX_AMQP_URL".into(), servers.amqp_url.clone()));
        relay_env_all.extend(owned(relay_env));
        let consumer_http = free_address();
        let mut consumer_env_all = owned(&[
            ("DISPATCH_MAX_DELIVERIES", "3"),
            ("DISPATCH_RETRY_BASE_MS", "50"),
            ("DISPATCH_RETRY_MAX_MS", "200"),
            ("DISPATCH_PREFETCH", "16"),
            ("RUST_LOG", "error"),
        ]);
        if servers.quorum_queues {
            consumer_env_all.push(("DISPATCH_QUEUE_TYPE".into(), "quorum".into()));
        }
        consumer_env_all.extend(owned(consumer_env));
        consumer_env_all.push(("DISPATCH_HTTP_ADDR".into(), consumer_http.clone()));
        let mut pipeline = Pipeline {
            servers: servers.clone(),
            app,
            dispatch_db,
            consumer: spawn_dispatch_process(&dispatch, &borrowed(&consumer_env_all)),
            dispatch,
            names,
            audit_queue: unique_name("audit_q"),
            relays: Vec::new(),
            consumer_http,
            relay_env: relay_env_all,
            consumer_env: consumer_env_all,
        };
        wait_for_consumers_on(&servers.amqp_url, &pipeline.names.queue, 1).await;
        pipeline.declare_audit_queue().await;
        for _ in 0..relays {
            let relay = pipeline.spawn_relay();
            pipeline.relays.push(relay);
        }
        pipeline
    }

    pub fn spawn_relay(&self) -> Child {
        spawn_relay_process(&self.app, &borrowed(&self.relay_env))
    }

    /// SIGKILLs relay `index` and starts a new one in its place.
    pub fn kill_and_restart_relay(&mut self, index: usize) {
        kill(&mut self.relays[index]);
        self.relays[index] = self.spawn_relay();
    }

    /// Another dispatch process on the same queue, with its own HTTP port.
    pub fn spawn_second_consumer(&self) -> Child {
        let mut env = borrowed(&self.consumer_env);
        env.push(("DISPATCH_HTTP_ADDR", "127.0.0.1:0"));
        spawn_dispatch_process(&self.dispatch, &env)
    }

    /// SIGKILLs the consumer, deliveries in hand, and starts a new one.
    pub fn kill_and_restart_consumer(&mut self) {
        kill(&mut self.consumer);
        self.consumer = spawn_dispatch_process(&self.dispatch, &borrowed(&self.consumer_env));
    }

    /// Stops the consumer as an orchestrator's rolling restart would
    /// (SIGTERM: it finishes its batches in hand for its shutdown timeout
    /// and gives the rest back) and starts a new one.
    pub fn terminate_and_restart_consumer(&mut self) {
        let pid = self.consumer.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let _ = self.consumer.wait();
        self.consumer = spawn_dispatch_process(&self.dispatch, &borrowed(&self.consumer_env));
    }

    async fn declare_audit_queue(&self) {
        let connection = connect_to(&self.servers.amqp_url).await;
        let channel = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(300_000));
        if self.servers.quorum_queues {
            // On a cluster it must outlive the loss of a node, as the consumer's does.
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        channel
            .queue_declare(
                self.audit_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare audit queue");
        channel
            .queue_bind(
                self.audit_queue.as_str().into(),
                self.names.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind audit queue");
        let _ = connection.close(200, "done".into()).await;
    }

    /// Every child still running, the consumer ready: the health check
    /// after a scenario (a probe message through the whole pipeline is the
    /// other half, in `books`).
    pub async fn assert_healthy(&mut self) {
        for relay in &mut self.relays {
            assert!(
                matches!(relay.try_wait(), Ok(None)),
                "a relay exited: {:?}",
                relay.try_wait()
            );
        }
        assert!(
            matches!(self.consumer.try_wait(), Ok(None)),
            "the consumer exited: {:?}",
            self.consumer.try_wait()
        );
        crate::dispatch::wait_until("the consumer is ready", || async {
            crate::http::request(&self.consumer_http, "GET", "/readyz", None)
                .await
                .0
                == 200
        })
        .await;
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for relay in &mut self.relays {
            kill(relay);
        }
        kill(&mut self.consumer);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A local port nobody listens on right now.
fn free_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// The common scenario: the load runs while `fault` strikes every `every`
/// (at least three times), then the books. `faults` names one strike.
pub async fn under_repeated_fault<F>(
    pipeline: &mut Pipeline,
    every: Duration,
    scenario: &str,
    faults: &str,
    mut fault: F,
) -> Books
where
    F: FnMut(&mut Pipeline),
{
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    let mut strikes = 0;
    loop {
        tokio::time::sleep(every).await;
        if load.is_finished() {
            break;
        }
        fault(pipeline);
        strikes += 1;
    }
    let load = load.await.expect("load");
    assert!(strikes >= 3, "{scenario}: only {strikes} {faults}");
    let faults = format!("{strikes} {faults}");
    settle_and_check(pipeline, &load, &Expected::default(), scenario, &faults).await
}
