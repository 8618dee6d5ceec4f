// A scriptable @rocicorp/zero client for the write tests.
//   node writer.mjs <server URL> <userID> [options JSON]
// (Zero options, plus "crudOnly": true for an app without custom mutators)
// Reads commands (JSON lines) on stdin:
//   {"cmd": "create", "tag": T, "args": {...}}     custom mutator item.create
//   {"cmd": "setTitle", "tag": T, "args": {...}}   custom mutator item.setTitle
//   {"cmd": "crud", "tag": T, "op": "insert"|"upsert"|"update"|"delete", "args": {...}}
//   {"cmd": "connect", "tag": T}                  reconnect after a fatal error
//   {"cmd": "many", "n": N, "prefix": P, "concurrency": C}  N creates; reports timings
// and writes JSON lines: {"view": [...]} on every change of `item` ordered by id,
// {"tag", "client": result} / {"tag", "server": result} for mutations,
// {"error": ...} for connection errors.
import {Zero} from '@rocicorp/zero';
import {schema, mutators} from './app.mjs';

const [server, userID, optsText] = process.argv.slice(2);
const {crudOnly, ...opts} = optsText ? JSON.parse(optsText) : {};
const out = v => process.stdout.write(JSON.stringify(v) + '\n');
const z = new Zero({
  server,
  schema,
  mutators: crudOnly ? undefined : mutators,
  userID,
  kvStore: 'mem',
  logLevel: 'error',
  ...opts,
});
const view = z.query.item.orderBy('id', 'asc').materialize();
view.addListener((data, resultType) => out({view: data, type: resultType}));

const detail = p =>
  p.then(
    r => r,
    e => ({type: 'exception', message: String(e?.message ?? e)}),
  );

async function run(c) {
  if (c.cmd === 'create' || c.cmd === 'setTitle') {
    const r = z.mutate(mutators.item[c.cmd](c.args));
    detail(r.client).then(v => out({tag: c.tag, client: v}));
    detail(r.server).then(v => out({tag: c.tag, server: v}));
  } else if (c.cmd === 'connect') {
    // What an app does after a fatal error (e.g. PushFailed): reconnect explicitly.
    await z.connection.connect();
    out({tag: c.tag, connected: true});
  } else if (c.cmd === 'crud') {
    const r = z.mutate.item[c.op](c.args);
    const p = r && typeof r.then === 'function' ? r : r?.client ?? Promise.resolve();
    detail(Promise.resolve(p)).then(v => out({tag: c.tag, client: v ?? {type: 'success'}}));
  } else if (c.cmd === 'many') {
    const times = [];
    let next = 0;
    const worker = async () => {
      while (next < c.n) {
        const i = next++;
        const t0 = performance.now();
        const r = z.mutate(mutators.item.create({id: `${c.prefix}-${i}`, title: 't', n: i}));
        const res = await r.server;
        if (res.type !== 'success') out({error: res});
        times.push(performance.now() - t0);
      }
    };
    const t0 = performance.now();
    await Promise.all(Array.from({length: c.concurrency ?? 1}, worker));
    out({tag: c.tag, done: c.n, ms: performance.now() - t0, times});
  }
}

let buf = '';
process.stdin.on('data', d => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (line.trim()) run(JSON.parse(line)).catch(e => out({error: String(e)}));
  }
});
const stop = async () => {
  view.destroy();
  await z.close();
  process.exit(0);
};
process.stdin.on('end', stop);

