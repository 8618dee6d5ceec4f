// Connects the unmodified @rocicorp/zero client to a zero-cache, materializes one query and
// prints the view as a JSON line every time it changes:
//   {"type": "complete" | "unknown", "data": [...]}
// Usage: node view.mjs <server URL>
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
if (!server) {
  console.error('usage: node view.mjs <server URL>');
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

const z = new Zero({server, schema, kvStore: 'mem', logLevel: 'error'});
const view = z.query.issue
  .where('open', true)
  .related('comments', q => q.orderBy('id', 'asc'))
  .orderBy('id', 'asc')
  .materialize();
view.addListener((data, resultType) => {
  process.stdout.write(JSON.stringify({type: resultType, data}) + '\n');
});

const stop = async () => {
  view.destroy();
  await z.close();
  process.exit(0);
};
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.resume();
