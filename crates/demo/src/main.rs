//! `demo`: the seed scenario end to end on this machine's PostgreSQL and
//! RabbitMQ. It creates the `orders` and `dispatch` databases when missing,
//! migrates both, starts the dispatch consumer (which declares the
//! topology), the relay and the order service in this process, places orders
//! through HTTP (order 100001 is the one dispatch handles slowly, 3 s, as in
//! the seed), then checks both databases itself and replays the seed's
//! original synchronous design for contrast.

mod http;
mod seed_replay;
mod services;
mod verdict;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_service::db::{self, with_dbname};

#[derive(Debug, Parser)]
#[command(
    name = "demo",
    about = "Orders flow to dispatch through the outbox; checked end to end"
)]
struct Args {
    /// A PostgreSQL URL whose role may create databases; the demo uses `orders` and `dispatch` next to it.
    #[arg(
        long,
        env = "DEMO_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "DEMO_AMQP_URL", default_value = outbox_service::amqp::DEFAULT_URL)]
    amqp_url: String,
    /// How many orders to place (order 100001 among them).
    #[arg(long, default_value_t = 2000)]
    orders: usize,
    /// Orders per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long to wait for the last deliveries.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    outbox_service::telemetry::init();
    match try_main(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("demo: error: {}", outbox::chain_line(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn try_main(args: Args) -> anyhow::Result<bool> {
    if args.orders == 0 || args.rate.is_nan() || args.rate <= 0.0 {
        anyhow::bail!("--orders and --rate must be positive");
    }
    let orders_url = with_dbname(&args.postgres_url, "orders");
    let dispatch_url = with_dbname(&args.postgres_url, "dispatch");
    services::create_databases(&args.postgres_url, &["orders", "dispatch"]).await?;
    let running = services::start(&orders_url, &dispatch_url, &args.amqp_url).await?;
    let orders_db = db::connect(&db::parse_url(&orders_url, None)?.named("demo")).await?;
    let dispatch_db = db::connect(&db::parse_url(&dispatch_url, None)?.named("demo")).await?;

    println!(
        "placing {} orders at {}/s through POST http://{}/orders (order {} takes dispatch 3 s)",
        args.orders,
        args.rate,
        running.orders_addr,
        seed_replay::SLOW_ORDER
    );
    let started = Instant::now();
    let placed = place_orders(&running.orders_addr, args.orders, args.rate, &dispatch_db).await?;
    wait_for_deliveries(&dispatch_db, placed, Duration::from_secs(args.timeout_secs)).await?;
    let verdict = verdict::check(&orders_db, &dispatch_db).await?;
    let elapsed = started.elapsed();

    println!("\nreplaying the seed's synchronous call (2 s read timeout) for contrast...");
    let seed = seed_replay::run(&orders_db, &dispatch_db, dispatch_url.clone()).await?;
    let outbox_slow_order = services::slow_order_state(&orders_db, &dispatch_db).await?;
    running.stop().await;

    report(&verdict, elapsed, &seed, outbox_slow_order);
    Ok(verdict.ok() && outbox_slow_order == (true, 1))
}

/// POSTs `count` orders at `rate` per second from a few concurrent clients;
/// prints progress once a second. Returns how many were accepted (201).
async fn place_orders(
    addr: &str,
    count: usize,
    rate: f64,
    dispatch_db: &tokio_postgres::Client,
) -> anyhow::Result<usize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (accepted, next, addr) = (accepted.clone(), next.clone(), addr.to_string());
        clients.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= count {
                    return anyhow::Ok(());
                }
                tokio::time::sleep_until(start + interval.mul_f64(n as f64)).await;
                let body = if n == 0 {
                    format!(
                        r#"{{"orderId": {}, "userName": "zhang", "context": "noodles", "num": 1}}"#,
                        seed_replay::SLOW_ORDER
                    )
                } else {
                    format!(
                        r#"{{"userName": "user{n}", "context": "order {n}", "num": {}}}"#,
                        1 + n % 5
                    )
                };
                let (status, answer) = http::request(
                    &addr,
                    "POST",
                    "/orders",
                    Some(&body),
                    Duration::from_secs(10),
                )
                .await?;
                if status != 201 {
                    anyhow::bail!("POST /orders answered {status}: {answer}");
                }
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    while !clients.iter().all(|c| c.is_finished()) {
        progress.tick().await;
        print_progress(accepted.load(Ordering::SeqCst), count, dispatch_db).await;
    }
    for client in clients {
        client.await??;
    }
    Ok(accepted.load(Ordering::SeqCst))
}

async fn delivered(dispatch_db: &tokio_postgres::Client) -> anyhow::Result<usize> {
    let count: i64 = dispatch_db
        .query_one("SELECT count(*) FROM dispatch.deliveries", &[])
        .await?
        .get(0);
    Ok(count as usize)
}

async fn print_progress(placed: usize, total: usize, dispatch_db: &tokio_postgres::Client) {
    let delivered = delivered(dispatch_db).await.unwrap_or_default();
    println!("  placed {placed:>6}/{total}   delivered {delivered:>6}");
}

async fn wait_for_deliveries(
    dispatch_db: &tokio_postgres::Client,
    expected: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last_print = Instant::now();
    while delivered(dispatch_db).await? < expected && Instant::now() < deadline {
        if last_print.elapsed() >= Duration::from_secs(1) {
            print_progress(expected, expected, dispatch_db).await;
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn report(
    verdict: &verdict::Verdict,
    elapsed: Duration,
    seed: &seed_replay::Outcome,
    outbox_slow_order: (bool, i64),
) {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "\n== outbox: {} orders in {:.1} s ==",
        verdict.orders,
        elapsed.as_secs_f64()
    );
    println!("  delivered exactly once   {}", verdict.delivered_once);
    println!("  lost (no delivery)       {}", verdict.missing.len());
    println!("  doubled or foreign       {}", verdict.extra.len());
    println!(
        "  commit -> delivery       p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        verdict.latency(0.5),
        verdict.latency(0.99),
        verdict.latency(1.0)
    );
    println!(
        "\n== order {}: seed design vs outbox ==",
        seed_replay::SLOW_ORDER
    );
    println!("  {:<28}{:<36}outbox", "", "seed (HTTP inside the tx)");
    println!(
        "  {:<28}{:<36}{}",
        "order exists",
        yes_no(seed.order_exists),
        yes_no(outbox_slow_order.0)
    );
    println!(
        "  {:<28}{:<36}{}",
        "deliveries", seed.deliveries, outbox_slow_order.1
    );
    let consistent = |order: bool, deliveries: i64| {
        if order == (deliveries == 1) && deliveries <= 1 {
            "yes"
        } else {
            "NO"
        }
    };
    println!(
        "  {:<28}{:<36}{}",
        "databases agree",
        consistent(seed.order_exists, seed.deliveries),
        consistent(outbox_slow_order.0, outbox_slow_order.1)
    );
    println!("  seed call: {}", seed.call);
    let ok = verdict.ok() && outbox_slow_order == (true, 1);
    println!(
        "\nverdict: {}",
        if ok {
            "PASS: every order has exactly one delivery, nothing lost, nothing doubled"
        } else {
            "FAIL"
        }
    );
}
