locals {
  tags         = merge(var.tags, { "karrots:module" = "worker-iam" })
  policies_dir = coalesce(var.policies_dir, "${path.module}/../../policies")
  # One policy per concern, each named as its file (seed: "the same name as their JSON file").
  # Ten: the most managed policies one IAM group can have attached.
  worker_policies = toset([
    "karrots-worker-autoscale",
    "karrots-worker-cloudtrail",
    "karrots-worker-ec2",
    "karrots-worker-ecr",
    "karrots-worker-eks",
    "karrots-worker-iam",
    "karrots-worker-kms-logs",
    "karrots-worker-route53",
    "karrots-worker-state",
    "karrots-worker-sts",
  ])
  accounts = {
    account_id      = var.account_id
    main_account_id = var.main_account_id
    data_account_id = var.data_account_id
  }
}

resource "aws_iam_policy" "worker" {
  for_each = local.worker_policies

  name        = each.key
  description = "Karrots worker: ${trimprefix(each.key, "karrots-worker-")}"
  policy      = templatefile("${local.policies_dir}/${each.key}.json", local.accounts)
  tags        = local.tags
}

# The permissions boundary every role the worker creates must carry (its karrots-worker-iam
# policy allows no role without it). Not attached to the worker: it caps what those roles can
# ever do, whatever policy the worker gives them.
resource "aws_iam_policy" "boundary" {
  name        = "karrots-worker-boundary"
  description = "Karrots worker: the permissions boundary of every role it creates"
  policy      = templatefile("${local.policies_dir}/karrots-worker-boundary.json", local.accounts)
  tags        = local.tags
}

resource "aws_iam_group" "worker" {
  name = "karrots-worker"
}

resource "aws_iam_group_policy_attachment" "worker" {
  for_each = local.worker_policies

  group      = aws_iam_group.worker.name
  policy_arn = aws_iam_policy.worker[each.key].arn
}

resource "aws_iam_user" "worker" {
  # checkov:skip=CKV_AWS_273:These are not people: the daemon's worker identity is an IAM user by design (its key is the one credential Karrots is given; people use SSO). The karrots-worker group caps it, and it cannot change its own permissions.
  for_each = toset(var.user_names)

  name = "karrots-worker-${each.key}"
  tags = local.tags
}

resource "aws_iam_user_group_membership" "worker" {
  for_each = toset(var.user_names)

  user   = aws_iam_user.worker[each.key].name
  groups = [aws_iam_group.worker.name]
}
