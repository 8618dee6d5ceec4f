// Runs N unmodified @rocicorp/zero clients (each its own client group, kvStore 'mem') in one
// Node process against a zero-cache. Each materializes the same query as view.mjs. Whenever a
// view changes it prints one JSON line summarizing all of them:
//   {"complete": <views with a complete result>, "distinct": [<distinct complete results>]}
// Usage: node many.mjs <server URL> <N>
// The process runs until it is killed or its stdin closes.
import {
  Zero,
  createSchema,
  table,
  string,
  boolean,
  number,
  json,
  relationships,
} from '@rocicorp/zero';

const server = process.argv[2];
const n = Number(process.argv[3] ?? '1');
if (!server || !(n > 0)) {
  console.error('usage: node many.mjs <server URL> <N>');
  process.exit(2);
}

const issue = table('issue')
  .columns({
    id: string(),
    title: string(),
    open: boolean(),
    n: number().optional(),
    meta: json().optional(),
  })
  .primaryKey('id');
const comment = table('comment')
  .columns({id: string(), issueID: string(), body: string()})
  .primaryKey('id');
const issueRelationships = relationships(issue, ({many}) => ({
  comments: many({sourceField: ['id'], destSchema: comment, destField: ['issueID']}),
}));
const schema = createSchema({
  tables: [issue, comment],
  relationships: [issueRelationships],
  enableLegacyQueries: true,
});

const latest = new Array(n).fill(null);
const clients = [];
let scheduled = false;
const report = () => {
  scheduled = false;
  const distinct = new Set();
  let complete = 0;
  for (const v of latest) {
    if (v && v.type === 'complete') {
      complete++;
      distinct.add(v.data);
    }
  }
  process.stdout.write(
    JSON.stringify({complete, distinct: [...distinct].map(d => JSON.parse(d))}) + '\n',
  );
};

for (let i = 0; i < n; i++) {
  const z = new Zero({server, schema, userID: `u${i}`, kvStore: 'mem', logLevel: 'error'});
  const view = z.query.issue
    .where('open', true)
    .related('comments', q => q.orderBy('id', 'asc'))
    .orderBy('id', 'asc')
    .materialize();
  view.addListener((data, resultType) => {
    latest[i] = {type: resultType, data: JSON.stringify(data)};
    if (!scheduled) {
      scheduled = true;
      setTimeout(report, 10);
    }
  });
  clients.push({z, view});
}

const stop = async () => {
  for (const {z, view} of clients) {
    view.destroy();
    await z.close();
  }
  process.exit(0);
};
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.resume();
