//! Quorum queues and RabbitMQ 4.x's delivery limit: the consumer's quorum
//! queues are declared with a limit no message reaches, so a message
//! returned by restarts is never dead-lettered by the broker; a queue an
//! older consumer declared without one is taken as it is.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use outbox_consumer::{QueueType, Topology};
use outbox_tests::broker::{connect, rabbitmqctl_command};
use outbox_tests::dispatch::wait_for;
use outbox_tests::*;

fn quorum_topology() -> Topology {
    let mut topology = Topology::named(&unique_name("test_dl_ex"), &unique_name("test_dl_q"));
    topology.queue_type = QueueType::Quorum;
    topology.expires = Some(Duration::from_secs(300));
    topology
}

/// The queue's arguments as `rabbitmqctl list_queues` prints them.
fn queue_arguments(queue: &str) -> String {
    let output = rabbitmqctl_command()
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "arguments",
        ])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} not listed"))
        .to_string()
}

#[tokio::test]
async fn a_message_returned_more_than_twenty_times_stays_in_a_quorum_queue() {
    let connection = connect().await;
    let topology = quorum_topology();
    topology.declare(&connection).await.expect("declare");
    for queue in [
        &topology.queue,
        &topology.retry_queue,
        &topology.dead_letter_queue,
    ] {
        let arguments = queue_arguments(queue);
        assert!(
            arguments.contains("x-delivery-limit") && arguments.contains("1000000000"),
            "{arguments}"
        );
    }

    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .basic_publish(
            "".into(),
            topology.queue.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    // RabbitMQ 4.0 to 4.2 would dead-letter it at its 21st delivery.
    for delivery in 1..=25 {
        // Bounded: a message the broker dead-lettered never comes back.
        let message = wait_for(&format!("delivery {delivery} of the message"), || async {
            channel
                .basic_get(topology.queue.as_str().into(), BasicGetOptions::default())
                .await
                .expect("get")
        })
        .await;
        if delivery == 25 {
            message.ack(BasicAckOptions::default()).await.expect("ack");
            break;
        }
        message
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("return");
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_quorum_queue_declared_without_the_limit_is_taken_as_it_is() {
    let connection = connect().await;
    let topology = quorum_topology();
    // As a consumer before the limit declared it.
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(300_000));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.dead_letter_exchange.as_str().into()),
    );
    channel
        .queue_declare(
            topology.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("legacy queue");
    topology
        .declare(&connection)
        .await
        .expect("declared over the legacy queue");
    assert!(!queue_arguments(&topology.queue).contains("x-delivery-limit"));
    assert!(queue_arguments(&topology.retry_queue).contains("x-delivery-limit"));
    let _ = connection.close(200, "done".into()).await;
}
