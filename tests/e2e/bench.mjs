// Benchmark driver for `cargo bench --bench sync`: unmodified @rocicorp/zero clients (kvStore
// 'mem', each its own client group) with the zbugs-like schema. Reads one JSON command per line
// on stdin and answers with one JSON line per command (and a {"done": ...} line when an armed
// expectation holds). Timings of hydration are taken here; update latencies by the caller.
import {
  Zero,
  createSchema,
  table,
  string,
  boolean,
  number,
  relationships,
} from '@rocicorp/zero';
import readline from 'node:readline';

const server = process.argv[2];
if (!server) {
  console.error('usage: node bench.mjs <server URL>');
  process.exit(2);
}

const user = table('user')
  .columns({
    id: string(),
    login: string(),
    name: string().optional(),
    avatar: string().optional(),
    role: string(),
  })
  .primaryKey('id');
const issue = table('issue')
  .columns({
    id: string(),
    shortID: number().optional(),
    title: string(),
    open: boolean(),
    modified: number(),
    created: number(),
    creatorID: string(),
    assigneeID: string().optional(),
    description: string().optional(),
    visibility: string(),
  })
  .primaryKey('id');
const comment = table('comment')
  .columns({id: string(), issueID: string(), created: number(), body: string(), creatorID: string()})
  .primaryKey('id');
const label = table('label').columns({id: string(), name: string()}).primaryKey('id');
const issueLabel = table('issueLabel')
  .columns({labelID: string(), issueID: string()})
  .primaryKey('labelID', 'issueID');
const issueRelationships = relationships(issue, ({one, many}) => ({
  creator: one({sourceField: ['creatorID'], destField: ['id'], destSchema: user}),
  comments: many({sourceField: ['id'], destField: ['issueID'], destSchema: comment}),
  labels: many(
    {sourceField: ['id'], destField: ['issueID'], destSchema: issueLabel},
    {sourceField: ['labelID'], destField: ['id'], destSchema: label},
  ),
}));
const commentRelationships = relationships(comment, ({one}) => ({
  creator: one({sourceField: ['creatorID'], destField: ['id'], destSchema: user}),
}));
const schema = createSchema({
  tables: [user, issue, comment, label, issueLabel],
  relationships: [issueRelationships, commentRelationships],
  enableLegacyQueries: true,
});

// The three queries of the engine issue (benches/engine.rs).
const queries = {
  q1: (z, limit = 100) =>
    z.query.issue
      .where('open', true)
      .related('creator')
      .related('labels')
      .orderBy('modified', 'desc')
      .limit(limit),
  q2: (z, id) =>
    z.query.issue
      .where('id', id)
      .related('comments', c => c.related('creator').orderBy('created', 'desc').limit(100))
      .one(),
  q3: (z, name = 'bug') =>
    z.query.issue
      .whereExists('labels', l => l.where('name', name))
      .orderBy('created', 'asc')
      .limit(50),
};

// BENCH_TRACE=1: each hydration also reports (on stderr) when the client sent its
// changeDesiredQueries and when the poke that completed it began and ended, which splits the
// client's time into its query-change throttle, the server, and the client's own processing.
const trace = process.env.BENCH_TRACE === '1' ? [] : null;
if (trace) {
  const Base = globalThis.WebSocket;
  globalThis.WebSocket = class extends Base {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', e => {
        const s = typeof e.data === 'string' ? e.data : '';
        if (s.startsWith('["pokeStart"') || s.startsWith('["pokeEnd"')) {
          trace.push([s.slice(2, 11), performance.now(), s.length]);
        } else if (s.startsWith('["pokePart"')) {
          trace.push(['pokePart', performance.now(), s.length]);
        }
      });
    }
    send(data) {
      if (typeof data === 'string' && data.startsWith('["changeDesiredQueries"')) {
        trace.push(['changeDQ', performance.now(), data.length]);
      }
      super.send(data);
    }
  };
}

let n = 0;
const newZero = () =>
  new Zero({server, schema, userID: `bench${n++}`, kvStore: 'mem', logLevel: 'error'});

const reply = o => process.stdout.write(JSON.stringify(o) + '\n');

// Materializes `query` and resolves with {view, ms} once its result is complete.
const hydrate = query =>
  new Promise(resolve => {
    const t0 = performance.now();
    const view = query.materialize();
    let done = false;
    const state = {data: undefined};
    view.addListener((data, type) => {
      state.data = data;
      check();
      if (!done && type === 'complete') {
        done = true;
        resolve({view, state, ms: performance.now() - t0});
      }
    });
  });

let armed = null;
const check = () => {
  if (armed && armed()) {
    armed = null;
    if (trace) {
      // Wall-clock milliseconds, to line up with the server's log timestamps.
      const wall = t => (performance.timeOrigin + t).toFixed(3);
      const ev = trace.map(([k, t, len]) => `${k}@${wall(t)}(${len}B)`).join(' ');
      process.stderr.write(`trace update: ${ev} done@${wall(performance.now())}\n`);
      trace.length = 0;
    }
    reply({done: true});
  }
};

let main = null;
let many = [];

const handlers = {
  async hydrate({q, arg}) {
    const z = newZero();
    // Connect (and warm the connection) with a tiny query first.
    await hydrate(z.query.label.where('id', 'none'));
    if (trace) trace.length = 0;
    const t0 = performance.now();
    const {view, ms} = await hydrate(queries[q](z, arg));
    if (trace) {
      const done = performance.now();
      const ev = trace.map(([k, t, len]) => `${k}@${(t - t0).toFixed(1)}(${len}B)`).join(' ');
      process.stderr.write(`trace ${q}: ${ev} complete@${(done - t0).toFixed(1)}\n`);
    }
    view.destroy();
    z.close();
    return {ms};
  },
  async open({q2id}) {
    const z = newZero();
    const q1 = await hydrate(queries.q1(z));
    const q2 = await hydrate(queries.q2(z, q2id));
    const q3 = await hydrate(queries.q3(z));
    main = {z, q1: q1.state, q2: q2.state, q3: q3.state};
    return {q1: q1.state.data.slice(0, 3).map(i => i.id), q3: q3.state.data.map(i => i.id)};
  },
  async expect({kind, id, v}) {
    const preds = {
      q1top: () => main.q1.data[0]?.id === id && main.q1.data[0]?.modified === v,
      q2comment: () => (main.q2.data?.comments ?? []).some(c => c.id === id && c.body === v),
      q3title: () => main.q3.data.some(i => i.id === id && i.title === v),
      label: () =>
        many.length > 0 &&
        many.every(s => s.data.some(i => i.labels.some(l => l.id === id && l.name === v))),
    };
    armed = preds[kind];
    if (trace) trace.length = 0;
    return {armed: true};
  },
  async many({count}) {
    const t0 = performance.now();
    const started = [];
    for (let i = 0; i < count; i++) {
      const z = newZero();
      started.push(hydrate(queries.q1(z)).then(r => ({z, ...r})));
    }
    const all = await Promise.all(started);
    many = all.map(r => r.state);
    return {ms: performance.now() - t0};
  },
};

const rl = readline.createInterface({input: process.stdin});
rl.on('line', async line => {
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'exit') {
    process.exit(0);
  }
  try {
    reply(await handlers[cmd.cmd](cmd));
    check();
  } catch (e) {
    reply({error: String(e && e.stack ? e.stack : e)});
  }
});
rl.on('close', () => process.exit(0));
