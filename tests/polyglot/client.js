// Node side of tests/test_polyglot.py: npm's `thrift` (pinned to the compiler's
// version) with code from `thrift --gen js:node` on idl/polyglot.thrift.
//
//   node client.js <gen-nodejs dir> <host> <port> <buffered|framed> <binary|compact>
// makes the test's calls and prints "ok <whoami>" (exit 1 and a reason otherwise).
"use strict";
const [gen, host, port, transportName, protocolName] = process.argv.slice(2);
const thrift = require("thrift");
const Int64 = require("node-int64");
const PolyService = require(gen + "/PolyService");
const types = require(gen + "/polyglot_types");

function fail(why) {
  console.log("FAILED: " + why);
  process.exit(1);
}

async function main() {
  const connection = thrift.createConnection(host, Number(port), {
    transport: transportName === "framed" ? thrift.TFramedTransport : thrift.TBufferedTransport,
    protocol: protocolName === "compact" ? thrift.TCompactProtocol : thrift.TBinaryProtocol,
    connect_timeout: 5000,
    max_attempts: 1,
  });
  connection.on("error", (err) => fail("connection error " + err));
  const client = thrift.createClient(PolyService, connection);
  const record = new types.Sample({
    id: new Int64("ffdfffffffffffff"),  // -9007199254740993: beyond a double's exact range
    tags: ["a", "b\u00e9", ""],
    counts: {x: new Int64("7fffffffffffffff"), y: new Int64(-1)},
    blob: Buffer.from([0, 1, 0x80, 0xff]),
  });
  const back = await client.roundtrip(record);
  if (back.id.toOctetString() !== "ffdfffffffffffff") fail("id " + back.id.toOctetString());
  if (JSON.stringify(back.tags) !== JSON.stringify(record.tags)) fail("tags " + back.tags);
  if (back.counts.x.toOctetString() !== "7fffffffffffffff" || back.counts.y.toNumber() !== -1)
    fail("counts " + JSON.stringify(back.counts));
  if (!Buffer.from(back.blob).equals(record.blob)) fail("blob " + back.blob);
  const name = await client.whoami();
  try {
    await client.fail("boom");
    fail("fail() returned");
  } catch (err) {
    if (!(err instanceof types.PolyError) || err.message !== "boom") fail("fail() raised " + err);
  }
  const tag = "node-" + transportName + "-" + protocolName;
  client.note(tag);
  const notes = await client.notes();  // the call after a oneway, same connection
  if (!notes.includes(tag)) fail("notes " + notes);
  console.log("ok " + name);
  connection.end();
}

main().catch((err) => fail(String(err && err.stack || err)));
