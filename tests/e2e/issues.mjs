// The issue/comment app shared by view.mjs and many.mjs: the schema and the query both
// materialize (open issues with their comments), and the stop-on-stdin-end wiring.
import {
  createSchema,
  table,
  string,
  boolean,
  number,
  json,
  relationships,
} from '@rocicorp/zero';

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
export const schema = createSchema({
  tables: [issue, comment],
  relationships: [issueRelationships],
  enableLegacyQueries: true,
});

// Open issues by id, each with its comments by id, materialized on `z`.
export function materializeOpenIssues(z) {
  return z.query.issue
    .where('open', true)
    .related('comments', q => q.orderBy('id', 'asc'))
    .orderBy('id', 'asc')
    .materialize();
}

// Runs `stop` (then exits) when stdin ends or closes: the test closes stdin to end the process.
export function stopOnStdinEnd(stop) {
  const done = async () => {
    await stop();
    process.exit(0);
  };
  process.stdin.on('end', done);
  process.stdin.on('close', done);
  process.stdin.resume();
}
