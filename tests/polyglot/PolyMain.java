// Java side of tests/test_polyglot.py, built with Debian's libthrift-java (0.16)
// against code from `thrift --gen java` on idl/polyglot.thrift.
//
//   PolyMain client <host> <port> <buffered|framed> <binary|compact>
//       makes the test's calls and prints "ok" (exit 1 and a reason otherwise)
//   PolyMain server <selector|hsha|threadpool> <port> <binary|compact> <name>
//       serves on 127.0.0.1:<port>; prints "listening" once bound
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.util.*;
import org.apache.thrift.TException;
import org.apache.thrift.protocol.*;
import org.apache.thrift.server.*;
import org.apache.thrift.transport.*;
import org.apache.thrift.transport.layered.TFramedTransport;
import probe.polyglot.*;

public class PolyMain {
    static class Handler implements PolyService.Iface {
        final String name;
        final List<String> notes = Collections.synchronizedList(new ArrayList<>());
        Handler(String name) { this.name = name; }
        public Sample roundtrip(Sample record) { return record; }
        public String whoami() { return name; }
        public String fail(String message) throws PolyError { throw new PolyError(message); }
        public void note(String text) { notes.add(text); }
        public String notes() { return String.join(",", notes); }
    }

    static TProtocolFactory protocol(String name) {
        return name.equals("compact") ? new TCompactProtocol.Factory() : new TBinaryProtocol.Factory();
    }

    static void check(boolean ok, String what) {
        if (!ok) { System.out.println("FAILED: " + what); System.exit(1); }
    }

    static void client(String host, int port, String transport, String protocol) throws Exception {
        TTransport socket = new TSocket(host, port, 5000);
        TTransport t = transport.equals("framed") ? new TFramedTransport(socket) : socket;
        t.open();
        PolyService.Client client = new PolyService.Client(protocol(protocol).getProtocol(t));
        Sample record = new Sample();
        record.setId(-9007199254740993L);  // not a double: i64 must survive exactly
        record.setTags(Arrays.asList("a", "b\u00e9", ""));
        Map<String, Long> counts = new HashMap<>();
        counts.put("x", Long.MAX_VALUE);
        counts.put("y", -1L);
        record.setCounts(counts);
        record.setBlob(new byte[] {0, 1, (byte) 0x80, (byte) 0xff});
        Sample back = client.roundtrip(record);
        check(back.equals(record), "roundtrip returned " + back);
        check(client.whoami().length() > 0, "whoami");
        try {
            client.fail("boom");
            check(false, "fail() returned");
        } catch (PolyError e) {
            check("boom".equals(e.getMessage()), "PolyError message " + e.getMessage());
        }
        client.note("java-" + transport + "-" + protocol);
        String notes = client.notes();  // the call after a oneway: same connection, in step
        check(notes.contains("java-" + transport + "-" + protocol), "notes " + notes);
        System.out.println("ok " + client.whoami());
        t.close();
    }

    static void server(String kind, int port, String protocol, String name) throws Exception {
        PolyService.Processor<Handler> processor = new PolyService.Processor<>(new Handler(name));
        InetSocketAddress address = new InetSocketAddress("127.0.0.1", port);
        TServer server;
        if (kind.equals("selector")) {
            server = new TThreadedSelectorServer(new TThreadedSelectorServer.Args(
                new TNonblockingServerSocket(address)).processor(processor).protocolFactory(protocol(protocol)));
        } else if (kind.equals("hsha")) {
            server = new THsHaServer(new THsHaServer.Args(
                new TNonblockingServerSocket(address)).processor(processor).protocolFactory(protocol(protocol)));
        } else {
            server = new TThreadPoolServer(new TThreadPoolServer.Args(
                new TServerSocket(address)).processor(processor).protocolFactory(protocol(protocol)));
        }
        System.out.println("listening");
        System.out.flush();
        server.serve();
    }

    public static void main(String[] args) throws Exception {
        if (args[0].equals("client")) {
            client(args[1], Integer.parseInt(args[2]), args[3], args[4]);
        } else {
            server(args[1], Integer.parseInt(args[2]), args[3], args[4]);
        }
    }
}
