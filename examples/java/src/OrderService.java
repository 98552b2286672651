// The seed's OrderService.createOrder in plain JDBC, with the outbox.
//
// The seed's version inserts the order, then calls the dispatch center over
// HTTP inside the same transaction: when the call times out the order rolls
// back while dispatch has already written its delivery. Here the order row
// and its message commit together in one transaction (outbox.enqueue writes
// a row of outbox.messages); outbox-relay publishes the message to RabbitMQ
// after the commit, and a rolled-back order leaves no message behind.
//
//   java -cp build:/usr/share/java/postgresql.jar OrderService [ORDER_ID] [--fail-after-enqueue]
//
// DATABASE_URL: postgres://user[:password]@host[:port]/db (or a jdbc: URL).
// OUTBOX_EXCHANGE: where the message goes (default order_confirm_fanoutExchange).
// TRACEPARENT / TRACESTATE: the W3C trace context of a traced parent process
// (OpenTelemetry's environment variables as carrier). The order's span is a
// child of that parent (a new root without one), and the message's headers
// carry it as `traceparent` (and `tracestate`): outbox-relay's publish span
// continues it.
// Prints `order_id=N message_id=UUID` once the transaction has committed.

import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.security.SecureRandom;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Arrays;
import java.util.HexFormat;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ThreadLocalRandom;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public final class OrderService {

    /** The seed's Order entity. */
    record Order(long orderId, String userName, String context, int num) {
        /** The message body: the same JSON as the demo's order service sends. */
        String toJson() {
            return "{\"orderId\": " + orderId + ", \"userName\": " + quote(userName)
                    + ", \"context\": " + quote(context) + ", \"num\": " + num + "}";
        }
    }

    /**
     * This app's span, as W3C Trace Context headers. No Maven repository (nor
     * OpenTelemetry jar) is at hand here, so it is done by hand; with the
     * OpenTelemetry Java API it is
     * `W3CTraceContextPropagator.getInstance().inject(Context.current(), headers, Map::put)`.
     */
    record Span(String traceparent, String tracestate) {
        static final Pattern TRACEPARENT =
                Pattern.compile("00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})");
        static final SecureRandom RANDOM = new SecureRandom();

        /** A child of the span TRACEPARENT names when it is valid; a new root otherwise. */
        static Span fromEnvironment() {
            String parent = System.getenv("TRACEPARENT");
            Matcher m = TRACEPARENT.matcher(parent == null ? "" : parent.trim());
            if (m.matches() && !m.group(1).matches("0+") && !m.group(2).matches("0+")) {
                String state = System.getenv("TRACESTATE");
                return new Span("00-" + m.group(1) + "-" + randomId(8) + "-" + m.group(3),
                        state == null || state.isBlank() ? null : state.trim());
            }
            return new Span("00-" + randomId(16) + "-" + randomId(8) + "-01", null);
        }

        /** A random id of `bytes` bytes in lowercase hex; never all zeros (invalid). */
        static String randomId(int bytes) {
            byte[] id = new byte[bytes];
            do {
                RANDOM.nextBytes(id);
            } while (Arrays.equals(id, new byte[bytes]));
            return HexFormat.of().formatHex(id);
        }
    }

    /** Thrown by --fail-after-enqueue: anything that fails after the enqueue. */
    static final class SimulatedFailure extends Exception {
        final UUID messageId;

        SimulatedFailure(UUID messageId) {
            super("simulated failure after enqueue");
            this.messageId = messageId;
        }
    }

    static final String CREATE_ORDERS = "CREATE TABLE IF NOT EXISTS orders ("
            + "id bigint PRIMARY KEY, user_name text NOT NULL, context text NOT NULL, num int NOT NULL)";

    private final Connection connection;
    private final String exchange;
    private final boolean failAfterEnqueue;
    private final Span span;

    OrderService(Connection connection, String exchange, boolean failAfterEnqueue, Span span) {
        this.connection = connection;
        this.exchange = exchange;
        this.failAfterEnqueue = failAfterEnqueue;
        this.span = span;
    }

    /**
     * One transaction: the order row and its outbox message. The seed's
     * `@Transactional(rollbackFor = Exception.class)`, by hand.
     */
    UUID createOrder(Order order) throws SQLException, SimulatedFailure {
        connection.setAutoCommit(false);
        try {
            saveOrder(order);
            UUID messageId = enqueue(order);
            if (failAfterEnqueue) {
                throw new SimulatedFailure(messageId);
            }
            connection.commit();
            return messageId;
        } catch (SQLException | SimulatedFailure | RuntimeException e) {
            connection.rollback();
            throw e;
        } finally {
            connection.setAutoCommit(true);
        }
    }

    /** The seed's OrderDao.saveOrder. */
    private void saveOrder(Order order) throws SQLException {
        try (PreparedStatement insert = connection.prepareStatement(
                "INSERT INTO orders (id, user_name, context, num) VALUES (?, ?, ?, ?)")) {
            insert.setLong(1, order.orderId());
            insert.setString(2, order.userName());
            insert.setString(3, order.context());
            insert.setInt(4, order.num());
            insert.executeUpdate();
        }
    }

    /** Replaces the seed's HTTP call (and its message_order table): one row in outbox.messages. */
    private UUID enqueue(Order order) throws SQLException {
        try (PreparedStatement enqueue = connection.prepareStatement(
                "SELECT outbox.enqueue(?, ?, ?::jsonb, ?::jsonb)")) {
            enqueue.setString(1, exchange);
            enqueue.setString(2, "");
            enqueue.setString(3, order.toJson());
            enqueue.setString(4, headers());
            try (ResultSet row = enqueue.executeQuery()) {
                row.next();
                return row.getObject(1, UUID.class);
            }
        }
    }

    /** The message's headers: who produced it, and the current span (the relay continues its trace). */
    private String headers() {
        String headers = "{\"producer\": \"examples/java\", \"traceparent\": " + quote(span.traceparent());
        if (span.tracestate() != null) {
            headers += ", \"tracestate\": " + quote(span.tracestate());
        }
        return headers + "}";
    }

    public static void main(String[] args) {
        long orderId = ThreadLocalRandom.current().nextLong(1_000_000L, Integer.MAX_VALUE);
        boolean failAfterEnqueue = false;
        for (String arg : args) {
            if (arg.equals("--fail-after-enqueue")) {
                failAfterEnqueue = true;
            } else if (arg.matches("[1-9][0-9]{0,17}")) {
                orderId = Long.parseLong(arg);
            } else {
                fail(2, "usage: OrderService [ORDER_ID] [--fail-after-enqueue]");
            }
        }
        String url = System.getenv("DATABASE_URL");
        if (url == null || url.isBlank()) {
            fail(2, "DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/shop)");
        }
        String exchange = System.getenv().getOrDefault("OUTBOX_EXCHANGE", "order_confirm_fanoutExchange");
        Order order = new Order(orderId, "张三", "方便面", 1);

        try (Connection connection = connect(url)) {
            requireOutboxSchema(connection);
            try (var statement = connection.createStatement()) {
                statement.execute(CREATE_ORDERS);
            }
            Span span = Span.fromEnvironment(); // this app's span, under its parent process's
            OrderService service = new OrderService(connection, exchange, failAfterEnqueue, span);
            try {
                UUID messageId = service.createOrder(order);
                System.out.println("order_id=" + orderId + " message_id=" + messageId);
            } catch (SQLException e) {
                if ("23505".equals(e.getSQLState())) { // unique_violation: the order id is taken
                    fail(1, "order " + orderId + " already exists: nothing was committed");
                }
                throw e;
            } catch (SimulatedFailure e) {
                fail(3, "rolled back: order " + orderId + " and message " + e.messageId
                        + " were never committed (--fail-after-enqueue)");
            }
        } catch (SQLException e) {
            fail(1, e.getMessage().lines().findFirst().orElse("database error"));
        }
    }

    static void requireOutboxSchema(Connection connection) throws SQLException {
        try (var statement = connection.createStatement();
                ResultSet row = statement.executeQuery(
                        "SELECT to_regclass('outbox.messages') IS NOT NULL")) {
            row.next();
            if (!row.getBoolean(1)) {
                fail(1, "the outbox schema is not installed in this database: run `outbox-relay migrate` "
                        + "or psql over sql/outbox/V*.sql first");
            }
        }
    }

    /** A JDBC connection from a postgres:// URL (what the other examples take) or a jdbc: URL. */
    static Connection connect(String url) throws SQLException {
        if (url.startsWith("jdbc:")) {
            return DriverManager.getConnection(url);
        }
        URI uri = URI.create(url);
        if (!"postgres".equals(uri.getScheme()) && !"postgresql".equals(uri.getScheme())) {
            fail(2, "DATABASE_URL must start with postgres:// or jdbc:postgresql://");
        }
        Properties properties = new Properties();
        String userInfo = uri.getRawUserInfo();
        if (userInfo != null) {
            String[] parts = userInfo.split(":", 2);
            properties.setProperty("user", decode(parts[0]));
            if (parts.length == 2) {
                properties.setProperty("password", decode(parts[1]));
            }
        }
        String host = uri.getHost() == null ? "localhost" : uri.getHost();
        int port = uri.getPort() == -1 ? 5432 : uri.getPort();
        String query = uri.getRawQuery() == null ? "" : "?" + uri.getRawQuery();
        return DriverManager.getConnection(
                "jdbc:postgresql://" + host + ":" + port + uri.getRawPath() + query, properties);
    }

    static String decode(String part) {
        return URLDecoder.decode(part, StandardCharsets.UTF_8);
    }

    static String quote(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }

    static void fail(int code, String message) {
        System.err.println("examples/java: " + message);
        System.exit(code);
    }
}
